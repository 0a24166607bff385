"""launch/slurm on a real single-node Slurm cluster: sbatch jobs, requeue and resume, a Hydra sweep.

The node has 2+ CPUs and eight fake GPUs; jobs keep the script's GPU defaults and run 2 CPU processes
(NPROC_PER_NODE=2) of the tiny recipe.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.jobs import ENDED, TINY, load_final_delta, run_dir_of, run_job, sbatch, wait_for_checkpoint
from tests.cluster.slurm import SlurmCluster
from tests.train.launch import ROOT, metrics

pytestmark = pytest.mark.slow  # each test runs Slurm jobs of 2 processes (about 10-30 s each)


def test_sbatch_trains_the_tiny_recipe_on_two_processes(slurm_cluster, tmp_path):
    job_id, log, info = run_job(slurm_cluster, tmp_path, [*TINY, "train.max_steps=8", "checkpoint.every=4"])
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    assert "--nnodes=1 --nproc_per_node=2 --rdzv_backend=c10d" in text
    assert f"--rdzv_endpoint=localhost:{20000 + int(job_id) % 10000} --rdzv_id={job_id}" in text

    run_dir = tmp_path / "outputs" / "lora_t5_tiny" / f"slurm-{job_id}"  # relative to the submit directory
    assert [r["step"] for r in metrics(run_dir)][-1] == 8
    state = json.loads((run_dir / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    load_final_delta(run_dir)


def test_a_failing_job_fails(slurm_cluster, tmp_path):
    _, log, info = run_job(slurm_cluster, tmp_path, [*TINY, "train.global_batch_size=15"])
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0"
    assert "not divisible by world size 2" in log.read_text()


def test_a_job_checkpoints_before_its_time_limit_and_requeues_itself(slurm_cluster, tmp_path):
    """``--time=1`` (a minute, Slurm's shortest): the run reads its job's end time and, 45 s before it
    (``checkpoint.time_limit_margin=45``), checkpoints at its next step and requeues the job itself. Each
    run trains a few seconds; after two such requeues the job is cancelled. No step is lost or logged twice.
    (``--signal=USR1@1``: Slurm's own warning, the fallback, comes at most 31 s before the end, after the
    run has stopped.)"""
    overrides = [*TINY, "train.max_steps=100000", "checkpoint.time_limit_margin=45", "train.log_every=1"]
    job_id, log = sbatch(slurm_cluster, tmp_path, overrides, "--time=1", "--signal=USR1@1")
    run_dir = run_dir_of(tmp_path, job_id)
    for run in (2, 3):  # each started as soon as it is pending (skipping the requeue delay and the scheduler's cadence)
        deadline = time.monotonic() + 120
        while not (log.exists() and f"job {job_id} run {run} (" in log.read_text()):
            assert time.monotonic() < deadline, (
                log.read_text()[-3000:] if log.exists() else "no job log"
            ) + f"\n{slurm_cluster.job(job_id)}\n{slurm_cluster.logs()}"
            if slurm_cluster.job(job_id).get("JobState") == "PENDING":
                slurm_cluster.start_now(job_id)
            time.sleep(0.3)
    wait_for_log(log, "resumed from", count=2)  # the third run is training
    slurm_cluster.run("scancel", job_id)
    slurm_cluster.wait_for(job_id, ENDED, timeout=60)

    text = log.read_text()
    stops = re.findall(
        r"stopped at step (\d+) on the job's time limit \(the job ends at [\d:]+, (\d+) s from now; margin 45 s\)", text
    )
    assert len(stops) >= 2, text[-6000:]
    assert all(int(left) <= 45 for _, left in stops)
    assert text.count(f"requeued job {job_id}: its next run continues from this checkpoint") >= 2
    resumed = [int(step) for step in re.findall(r"resumed from \S+/step_\d+ at step (\d+)", text)]
    assert resumed[:2] == [int(step) for step, _ in stops[:2]]
    logged = [r["step"] for r in metrics(run_dir)]
    assert logged == list(range(1, len(logged) + 1)) and len(logged) >= resumed[1]


def wait_for_log(log: Path, text: str, count: int = 1, timeout: float = 90) -> None:
    """Wait until the job's log holds ``text`` (``count`` times)."""
    deadline = time.monotonic() + timeout
    while not (log.exists() and log.read_text().count(text) >= count):
        assert time.monotonic() < deadline, log.read_text()[-6000:] if log.exists() else "no job log"
        time.sleep(0.2)


def sweep_command(cluster: SlurmCluster, sweep: Path, overrides: list[str]) -> list[str]:
    """``launch/train.py -m hydra/launcher=slurm`` with the sweep in ``sweep``, 2 CPU processes per job."""
    gpu = [] if cluster.gpus else ["hydra.launcher.gpus_per_node=0"]
    return [
        sys.executable,
        str(ROOT / "launch" / "train.py"),
        "-m",
        "hydra/launcher=slurm",
        f"hydra.sweep.dir={sweep}",
        "hydra.launcher.nproc_per_node=2",
        "hydra.launcher.timeout_min=10",
        *gpu,
        *TINY,
        *overrides,
    ]


def sweep_logs(sweep: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(sweep.glob(".submitit/*/*.out")))


@pytest.mark.skipif(
    os.environ.get("OPENDELTA_LONG_TESTS") != "1",
    reason="the requeued sweep below runs a sweep job under torchrun too, and every point of a sweep has its own "
    "directory in tests/train/test_no_lost_work.py; OPENDELTA_LONG_TESTS=1 runs it",
)
def test_hydra_multirun_on_slurm_runs_each_job_under_torchrun(slurm_cluster, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra is not installed")
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        sweep_command(slurm_cluster, sweep, ["train.max_steps=4,6"]),
        env={**slurm_cluster.env, "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = sweep_logs(sweep)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + logs
    for num, steps in ((0, 4), (1, 6)):
        run_dir = sweep / str(num)  # each job trains in its own Hydra job directory
        assert [r["step"] for r in metrics(run_dir)][-1] == steps
        load_final_delta(run_dir)
    assert logs.count("--nnodes=1 --nproc_per_node=2 --rdzv_backend=c10d") == 2


def test_a_requeued_sweep_job_resumes_and_the_sweep_waits_for_it(slurm_cluster, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra is not installed")
    sweep, steps = tmp_path / "sweep", 100
    overrides = [f"train.max_steps={steps}", "checkpoint.every=5", "train.log_every=1"]
    process = subprocess.Popen(
        sweep_command(slurm_cluster, sweep, overrides),
        env={**slurm_cluster.env, "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_checkpoint(sweep / "0", sweep / "multirun.yaml")
        (submitted,) = sweep.glob(".submitit/*/*_submitted.pkl")
        job_id = submitted.name.removesuffix("_submitted.pkl")
        slurm_cluster.run("scontrol", "requeue", job_id)
        deadline = time.monotonic() + 60
        while slurm_cluster.job(job_id).get("Restarts") != "1":
            assert time.monotonic() < deadline, sweep_logs(sweep)
            time.sleep(0.3)
        slurm_cluster.start_now(job_id)
        output, _ = process.communicate(timeout=300)
    finally:
        process.kill()
    logs = sweep_logs(sweep)
    assert process.returncode == 0, output[-3000:] + logs
    assert "no result is reported" in logs and f"job {job_id} run 2" in logs
    assert logs.count("--nnodes=1 --nproc_per_node=2 --rdzv_backend=c10d") == 2  # each run under torchrun
    resumed = re.search(r"resumed from \S+ at step (\d+)", logs)
    assert resumed and 5 <= int(resumed.group(1)) < steps, logs
    assert [r["step"] for r in metrics(sweep / "0")][-1] == steps
    load_final_delta(sweep / "0")
