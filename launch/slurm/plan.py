"""From a Slurm allocation and Hydra overrides to the command that trains on it.

One torchrun per node, started by ``srun``, each running ``G`` processes; the nodes meet through
torchrun's c10d rendezvous on the job's first node. ``train.sbatch`` runs this module
(``python -m launch.slurm.plan``) and executes what it prints; the sweep launcher
(``launch/hydra_plugins/opendelta_dist_launcher.py``) imports it. So this is the one place where Slurm's
environment becomes torchrun's arguments, e.g. for 4 nodes x 8 GPUs::

    SLURM_JOB_ID=4242 SLURM_NNODES=4 SLURM_JOB_NODELIST=gpu[017-020] SLURM_GPUS_ON_NODE=8
    -> srun --nodes=4 --ntasks=4 --ntasks-per-node=1 --kill-on-bad-exit=1
         python launch/slurm/torchrun.py --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d
         --rdzv_endpoint=gpu017:24242 --rdzv_id=4242 --max_restarts=0
         launch/train.py +recipe=... run_dir=outputs/<recipe>/slurm-4242 resume=auto

Environment variables read besides Slurm's:

- ``NPROC_PER_NODE``: processes per node (default: the GPUs Slurm gave the node; required on CPU nodes).
- ``RDZV_HOST`` / ``RDZV_PORT``: the rendezvous address (default: the first node of the job, and port
  20000 + job id modulo 10000, so that jobs sharing a node do not collide).
- ``TORCHRUN_MAX_RESTARTS``: torchrun's ``--max_restarts`` (default 0: Slurm's requeue handles failures).

The overrides are checked by composing the configuration (Hydra, no torch import) before anything
starts, so a typo fails in a second with Hydra's message instead of after the nodes are allocated.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN_PY = ROOT / "launch" / "train.py"
#: torchrun, ignoring SIGUSR1/SIGUSR2 so that Slurm's checkpoint signal reaches the workers and not its end
TORCHRUN_PY = ROOT / "launch" / "slurm" / "torchrun.py"
DEFAULT_PORT_BASE = 20000


class PlanError(ValueError):
    """The allocation or the overrides cannot make a training launch; the message says what to fix."""


def expand_hostlist(spec: str) -> list[str]:
    """Expand a Slurm host list (``gpu[017-020,031],login1``) into host names, in order.

    Raises:
        PlanError: the list is empty or malformed.
    """
    hosts: list[str] = []
    depth, start = 0, 0
    # commas inside brackets separate ranges, commas outside separate host groups
    for i, char in enumerate(spec + ","):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            if i > start:
                hosts.extend(_expand_group(spec[start:i], spec))
            start = i + 1
        if depth not in (0, 1):
            raise PlanError(f"malformed Slurm host list {spec!r}")
    if depth or not hosts:
        raise PlanError(f"malformed Slurm host list {spec!r}")
    return hosts


def _expand_group(group: str, spec: str) -> list[str]:
    """One host group: a prefix, then any number of ``[ranges]`` with text between them."""
    match = re.search(r"\[([^\[\]]*)\]", group)
    if match is None:
        if "]" in group:
            raise PlanError(f"malformed Slurm host list {spec!r}")
        return [group]
    head, tails = group[: match.start()], _expand_group(group[match.end() :], spec)
    names: list[str] = []
    for item in match.group(1).split(","):
        bounds = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if bounds is None or (bounds.group(2) is not None and int(bounds.group(2)) < int(bounds.group(1))):
            raise PlanError(f"malformed range {item!r} in Slurm host list {spec!r}")
        low, high = bounds.group(1), bounds.group(2) or bounds.group(1)
        names.extend(f"{head}{n:0{len(low)}d}{tail}" for n in range(int(low), int(high) + 1) for tail in tails)
    return names


def _positive_int(value: str, name: str, hint: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise PlanError(f"{name}={value!r} is not a positive integer; {hint}")
    return number


def _gpu_count(value: str) -> int:
    """Slurm's GPU counts come as ``8``, ``a100:8`` or ``gpu:a100:8``."""
    last = value.strip().split(":")[-1]
    return int(last) if last.isdigit() else 0


@dataclass(frozen=True)
class Allocation:
    """What a Slurm job (or one step of it) was given, read from its environment.

    Attributes:
        job_id: the job id (torchrun's rendezvous id).
        run_key: names the job's run directory; stable across requeues (``4242``, or ``4240_3`` in an array).
        nnodes: number of nodes.
        nodes: the nodes' host names, first is the head.
        nproc_per_node: processes torchrun starts on each node.
        cpus_per_task: CPUs for the one task per node (None: Slurm's default).
        rdzv_host: host of the c10d rendezvous store.
        rdzv_port: its port.
        max_restarts: torchrun's ``--max_restarts``.
        restart_count: how often Slurm has requeued this job (0 on the first run).
    """

    job_id: str
    run_key: str
    nnodes: int
    nodes: tuple[str, ...]
    nproc_per_node: int
    cpus_per_task: int | None
    rdzv_host: str
    rdzv_port: int
    max_restarts: int
    restart_count: int

    @classmethod
    def from_environment(cls, env: Mapping[str, str], nproc_per_node: int | None = None) -> Allocation:
        """Read the allocation from Slurm's variables (and the overrides in the module docstring).

        Args:
            env: the environment (``os.environ``).
            nproc_per_node: processes per node, when the caller knows better than the environment.

        Raises:
            PlanError: not inside a Slurm job, no way to tell the processes per node, or a bad value.
        """
        job_id = env.get("SLURM_JOB_ID", "")
        if not job_id:
            raise PlanError(
                "SLURM_JOB_ID is not set: this runs inside a Slurm job. Submit it with "
                "`sbatch launch/slurm/train.sbatch +recipe=NAME`, or use torchrun directly on one machine."
            )
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        if not nodelist:
            raise PlanError("SLURM_JOB_NODELIST is not set; is this a Slurm job?")
        nodes = expand_hostlist(nodelist)
        nnodes = _positive_int(env.get("SLURM_NNODES", str(len(nodes))), "SLURM_NNODES", "is this a Slurm job?")
        if nnodes != len(nodes):
            raise PlanError(f"SLURM_NNODES={nnodes} but SLURM_JOB_NODELIST={nodelist!r} names {len(nodes)} nodes")
        array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
        run_key = f"{array_job}_{array_task}" if array_job and array_task else job_id
        cpus = env.get("SLURM_CPUS_PER_TASK") or env.get("SLURM_CPUS_ON_NODE")
        return cls(
            job_id=job_id,
            run_key=run_key,
            nnodes=nnodes,
            nodes=tuple(nodes),
            nproc_per_node=nproc_per_node or processes_per_node(env),
            cpus_per_task=_positive_int(cpus, "SLURM_CPUS_PER_TASK", "check the job's --cpus-per-task")
            if cpus
            else None,
            rdzv_host=env.get("RDZV_HOST") or nodes[0],
            rdzv_port=_rendezvous_port(env, job_id),
            max_restarts=int(env.get("TORCHRUN_MAX_RESTARTS", "0") or 0),
            restart_count=int(env.get("SLURM_RESTART_COUNT", "0") or 0),
        )


def processes_per_node(env: Mapping[str, str]) -> int:
    """``NPROC_PER_NODE`` if set, else the GPUs Slurm gave each node.

    Raises:
        PlanError: neither is there (a CPU allocation needs ``NPROC_PER_NODE``), or a bad value.
    """
    if env.get("NPROC_PER_NODE"):
        return _positive_int(env["NPROC_PER_NODE"], "NPROC_PER_NODE", "set it to the processes to run per node")
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        count = _gpu_count(env.get(key, ""))
        if count:
            return count
    raise PlanError(
        "this allocation has no GPUs (SLURM_GPUS_ON_NODE and SLURM_GPUS_PER_NODE are unset): ask for them with "
        "`sbatch --gpus-per-node=G`, or set NPROC_PER_NODE=N to run N processes per node on CPUs"
    )


def _rendezvous_port(env: Mapping[str, str], job_id: str) -> int:
    if env.get("RDZV_PORT"):
        port = _positive_int(env["RDZV_PORT"], "RDZV_PORT", "give a free TCP port on the first node")
        if port > 65535:
            raise PlanError(f"RDZV_PORT={port} is not a TCP port (1-65535)")
        return port
    digits = re.sub(r"\D", "", job_id) or "0"
    return DEFAULT_PORT_BASE + int(digits) % 10000


def check_overrides(overrides: Sequence[str]) -> dict[str, object]:
    """Compose the run configuration from the overrides, as ``launch/train.py`` will.

    Returns:
        The composed configuration (plain containers; ``run_dir`` and ``engine`` are read from it).

    Raises:
        PlanError: a flag instead of an override, no recipe, or Hydra refuses the overrides (unknown
            recipe, engine or key, a sweep); the message is Hydra's.
    """
    flags = [o for o in overrides if o.startswith("-")]
    if flags:
        raise PlanError(
            f"only Hydra overrides (key=value) are passed to training, not {' '.join(flags)}. For a sweep use "
            "`python launch/train.py -m hydra/launcher=slurm ...`"
        )
    if not any(re.match(r"^\+{0,2}recipe=", o) for o in overrides):
        raise PlanError("no recipe given: add +recipe=NAME (a file of recipes/, e.g. +recipe=lora_t5_tiny)")
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
            cfg = compose("config", overrides=list(overrides))
        plain = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as exc:
        message = str(exc).split("\nConfig search path")[0].strip()
        raise PlanError(f"the overrides do not compose: {message}") from exc
    assert isinstance(plain, dict)
    return plain


def _has_override(overrides: Sequence[str], key: str) -> bool:
    return any(re.match(rf"^\+{{0,2}}{re.escape(key)}=", o) for o in overrides)


def training_overrides(overrides: Sequence[str], run_dir: str) -> list[str]:
    """The user's overrides plus ``run_dir`` (stable for the job, so a requeued run finds its
    checkpoints) and ``resume=auto``, unless the user gave either."""
    added = [f"{key}={value}" for key, value in (("run_dir", run_dir), ("resume", "auto"))]
    return [*overrides, *(a for a in added if not _has_override(overrides, a.split("=")[0]))]


def torchrun_command(alloc: Allocation, overrides: Sequence[str], python: str = sys.executable) -> list[str]:
    """torchrun for one node of the allocation, with c10d rendezvous on the head node (through
    ``launch/slurm/torchrun.py``, which leaves SIGUSR1 and SIGUSR2 to the training processes)."""
    return [
        python,
        str(TORCHRUN_PY),
        f"--nnodes={alloc.nnodes}",
        f"--nproc_per_node={alloc.nproc_per_node}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={alloc.rdzv_host}:{alloc.rdzv_port}",
        f"--rdzv_id={alloc.job_id}",
        f"--max_restarts={alloc.max_restarts}",
        str(TRAIN_PY),
        *overrides,
    ]


def srun_command(alloc: Allocation) -> list[str]:
    """srun that starts one task (one torchrun) on every node, with all of the node's CPUs."""
    cpus = [f"--cpus-per-task={alloc.cpus_per_task}"] if alloc.cpus_per_task else []
    return [
        "srun",
        f"--nodes={alloc.nnodes}",
        f"--ntasks={alloc.nnodes}",
        "--ntasks-per-node=1",
        *cpus,
        "--kill-on-bad-exit=1",
    ]


def plan(overrides: Sequence[str], env: Mapping[str, str], python: str = sys.executable) -> list[str]:
    """The full command of a batch job: ``srun ... torchrun ... launch/train.py overrides``.

    Raises:
        PlanError: see :meth:`Allocation.from_environment` and :func:`check_overrides`.
    """
    cfg = check_overrides(overrides)
    alloc = Allocation.from_environment(env)
    run_dir = f"{str(cfg['run_dir']).rstrip('/')}/slurm-{alloc.run_key}"
    return [*srun_command(alloc), *torchrun_command(alloc, training_overrides(overrides, run_dir), python)]


def main(argv: Sequence[str]) -> int:
    """Print the command, NUL-separated (for ``mapfile -d ''``); errors go to stderr with status 2."""
    try:
        command = plan(argv, os.environ)
    except PlanError as exc:
        print(f"train.sbatch: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write("".join(f"{arg}\0" for arg in command))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
