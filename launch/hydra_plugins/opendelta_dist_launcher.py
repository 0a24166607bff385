"""``hydra/launcher=slurm``: Hydra multirun on Slurm where every job is a torchrun launch.

    python launch/train.py -m hydra/launcher=slurm +recipe=lora_t5_base optim.lr=1e-4,3e-4,1e-3

Hydra's submitit launcher submits the sweep as a Slurm job array, one job per point of the sweep,
each with one task per node (``tasks_per_node: 1``). This subclass keeps all of that (resources, logs,
requeue on time-out) and adds two settings, ``nproc_per_node`` and ``max_restarts``. What each task
runs is :func:`run_torchrun`: torchrun for its node, built by ``launch/slurm/plan.py`` from the job's
Slurm environment exactly as ``train.sbatch`` builds it (``--nnodes``, ``--nproc_per_node``, c10d
rendezvous on the first node, the job id as rendezvous id). The training processes are therefore set
up as in any other launch, for every engine.

Each job trains in its own Hydra job directory (``<sweep dir>/<job number>``, unless the sweep sets
``run_dir``) with ``resume=auto``, so a job that Slurm requeues resumes from its last checkpoint:
near the time limit submitit's signal requeues it (``max_num_timeout`` times); on preemption or
``scontrol requeue`` Slurm requeues it. The task then exits without reporting a result, and the
requeued job runs the same launch again.

Hydra takes launchers only from a ``hydra_plugins`` package on the Python path: this directory is one
while ``launch/train.py`` runs (its directory is first on the path), and the job script puts it on the
path of the job's Python. The training script's own task function never runs in a job: the launcher
hands every job :func:`run_torchrun` instead, which starts training under torchrun.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
except ImportError as exc:  # the plugin is an optional dependency
    raise ImportError(
        "hydra/launcher=slurm needs Hydra's submitit launcher: pip install -c constraints.txt -e '.[slurm]'"
    ) from exc

# the repository root, for launch.slurm.plan (launch/train.py puts only its own directory on the path)
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))
from launch.slurm.plan import ROOT, Allocation, PlanError, torchrun_command, training_overrides

#: What the job's Python needs on its path: this ``hydra_plugins`` directory's parent and the root.
IMPORT_PATHS = (Path(__file__).resolve().parents[1], ROOT)


class TorchrunSlurmLauncher(SlurmLauncher):
    """Hydra's submitit Slurm launcher with the settings of a torchrun launch per node.

    Args:
        nproc_per_node: processes per node; None: the GPUs Slurm gives each node (or ``NPROC_PER_NODE``).
        max_restarts: torchrun's ``--max_restarts``.
        **params: the submitit launcher's parameters (``nodes``, ``gpus_per_node``, ``timeout_min``, ...).

    Raises:
        PlanError: ``tasks_per_node`` is not 1.
    """

    def __init__(self, nproc_per_node: int | None = None, max_restarts: int = 0, **params: Any) -> None:
        if int(params.get("tasks_per_node") or 1) != 1:
            raise PlanError(
                f"hydra.launcher.tasks_per_node={params['tasks_per_node']}: keep it 1 (one torchrun per node); "
                "set the processes per node with hydra.launcher.nproc_per_node"
            )
        super().__init__(**params)
        self.nproc_per_node = nproc_per_node
        self.max_restarts = max_restarts

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        """As the submitit launcher's, with :func:`run_torchrun` as every job's task: torchrun runs the training."""
        super().setup(hydra_context=hydra_context, task_function=run_torchrun, config=config)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        """Submit the sweep; the job script first puts this plugin on the job's Python path."""
        paths = ":".join(shlex.quote(str(p)) for p in IMPORT_PATHS)
        export = f"export PYTHONPATH={paths}${{PYTHONPATH:+:$PYTHONPATH}}"
        self.params["setup"] = [export, *(self.params.get("setup") or [])]
        return super().launch(job_overrides, initial_job_idx)


def _ignore_timeout_signal() -> None:
    # submitit's time-out signal (USR2) reaches every process of the job; it is meant for submitit's
    # handler in the task, which requeues the job. torchrun and its workers keep training until then.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def point_overrides(task: list[str], output_dir: str, job_num: int) -> list[str]:
    """The overrides one sweep point trains with: its own run directory (Hydra's job directory, or
    ``<run_dir>/<job number>`` when the sweep gives ``run_dir``, so that no two points share one) and
    ``resume=auto`` (see :func:`launch.slurm.plan.training_overrides`)."""
    given = [o for o in task if o.lstrip("+").startswith("run_dir=")]
    if not given:
        return training_overrides(task, output_dir)
    rest = [o for o in task if o not in given]
    return training_overrides(rest, os.path.join(given[-1].split("=", 1)[1], str(job_num)))


def run_torchrun(cfg: DictConfig) -> int:
    """One Slurm task (one node) of a sweep job: run torchrun for this node and wait for it.

    Args:
        cfg: the job's composed configuration (unused: the overrides go to launch/train.py as they came).

    Returns:
        0 when training succeeded.

    Raises:
        PlanError: the job's environment cannot make a launch (e.g. no GPUs and no ``nproc_per_node``).
        RuntimeError: torchrun failed (Hydra reports the job as failed).
    """
    hydra_cfg = HydraConfig.get()
    launcher = hydra_cfg.launcher
    nproc = launcher.get("nproc_per_node")
    env = {**os.environ, "TORCHRUN_MAX_RESTARTS": str(launcher.get("max_restarts") or 0)}
    alloc = Allocation.from_environment(env, nproc_per_node=int(nproc) if nproc else None)
    overrides = point_overrides(list(hydra_cfg.overrides.task), hydra_cfg.runtime.output_dir, hydra_cfg.job.num)
    command = torchrun_command(alloc, overrides)
    print(f"job {alloc.run_key} run {alloc.restart_count + 1}: " + shlex.join(command), flush=True)

    terminated: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(signum))
    try:
        status = subprocess.Popen(command, env=env, preexec_fn=_ignore_timeout_signal).wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if terminated:
        # Slurm is requeueing, preempting or cancelling the job and has stopped torchrun too: leave
        # without a result, so that the sweep waits for the requeued job instead of recording a failure.
        print("SIGTERM: the job is being requeued, preempted or cancelled; no result is reported", flush=True)
        sys.stderr.flush()
        os._exit(128 + signal.SIGTERM)
    if status != 0:
        raise RuntimeError(f"torchrun exited with status {status} on {', '.join(alloc.nodes)}; see this job's log")
    return 0
