"""Submitting launch/slurm/train.sbatch to a test cluster and reading what the job wrote."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from opendelta_dist import AutoDeltaModel
from opendelta_dist.train.models import ModelConfig, build_model
from tests.cluster.slurm import SlurmCluster
from tests.train.launch import ROOT

SCRIPT = ROOT / "launch" / "slurm" / "train.sbatch"
TINY = ["+recipe=lora_t5_tiny", "train.eval_every=0"]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def job_env(cluster: SlurmCluster, nproc_per_node: int = 2) -> dict[str, str]:
    """What a user's shell has at sbatch time: the environment active, the repository, CPU processes.

    One thread per process (``OMP_NUM_THREADS=1``): torchrun sets it only when it starts more than one
    process per node, and CPU kernels split sums by thread count, so runs that are compared bit for bit
    must have the same.
    """
    return {
        **cluster.env,
        "PYTHON": sys.executable,
        "OPENDELTA_DIST_ROOT": str(ROOT),
        "NPROC_PER_NODE": str(nproc_per_node),
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
    }


def sbatch(
    cluster: SlurmCluster,
    submit_dir: Path,
    overrides: list[str],
    *options: str,
    nproc_per_node: int = 2,
    env: dict[str, str] | None = None,
) -> tuple[str, Path]:
    """Submit train.sbatch from ``submit_dir`` (``env``: more variables for the job); returns the job id and its log."""
    gpu_options = [] if cluster.gpus else ["--gpus-per-node=0"]
    result = subprocess.run(
        cluster.client_argv(["sbatch", "--parsable", *gpu_options, *options, str(SCRIPT), *overrides]),
        env={**job_env(cluster, nproc_per_node), **(env or {})},
        cwd=submit_dir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    job_id = result.stdout.strip().split(";")[0]
    assert job_id.isdigit(), result.stdout + result.stderr
    return job_id, submit_dir / f"opendelta-{job_id}.out"


def run_job(
    cluster: SlurmCluster,
    submit_dir: Path,
    overrides: list[str],
    *options: str,
    nproc_per_node: int = 2,
    env: dict[str, str] | None = None,
) -> tuple[str, Path, dict[str, str]]:
    """Submit train.sbatch and wait for the job to end (polling: ``sbatch --wait`` backs off to 30 s)."""
    job_id, log = sbatch(cluster, submit_dir, overrides, *options, nproc_per_node=nproc_per_node, env=env)
    return job_id, log, cluster.wait_for(job_id, ENDED, timeout=300)


def run_dir_of(submit_dir: Path, job_id: str) -> Path:
    """Where train.sbatch's run of the tiny recipe writes (relative to the submit directory)."""
    return submit_dir / "outputs" / "lora_t5_tiny" / f"slurm-{job_id}"


def wait_for_checkpoint(run_dir: Path, log: Path, timeout: float = 120) -> Path:
    """Wait for the run's first complete checkpoint; returns it."""
    deadline = time.monotonic() + timeout
    while not (done := sorted((run_dir / "checkpoints").glob("step_*/trainer_state.json"))):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no job log"
        time.sleep(0.05)
    return done[0].parent


def final_delta(run_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of the run's final delta checkpoint."""
    return load_file(run_dir / "final_delta" / "delta_model.safetensors")


def load_final_delta(run_dir: Path) -> None:
    """The delta checkpoint loads onto a fresh tiny T5 and sets exactly the saved tensors."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = OmegaConf.to_container(compose("config", overrides=["+recipe=lora_t5_tiny"]), resolve=True)
    torch.manual_seed(cfg["seed"])  # the tiny T5 is randomly initialised: the same seed gives the same backbone
    model = build_model(ModelConfig(**cfg["model"]))
    AutoDeltaModel.from_finetuned(run_dir / "final_delta", model)
    saved = final_delta(run_dir)
    params = dict(model.named_parameters())
    assert saved
    for name, tensor in saved.items():
        torch.testing.assert_close(params[name], tensor, rtol=0, atol=0)
