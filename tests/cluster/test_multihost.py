"""launch/slurm/train.sbatch across emulated hosts: several nodes, a node lost mid-job, a smaller requeue.

Two hosts (``node1``, ``node2``), each a network namespace with its own address, hostname and slurmd
(:mod:`tests.cluster.multihost`); slurmctld runs on a third (``ctl``), where sbatch is called. Jobs are
the tiny recipe on CPU through the real script: one torchrun per node started by srun, c10d rendezvous
on node1, gloo between the hosts over the private bridge.

How each test loses a node:

- host crash: SIGKILL to every process of node2 (slurmd, slurmstepd, torchrun, worker), then the fast
  path: ``scontrol update NodeName=node2 State=DOWN`` (Slurm would notice by itself after ~25-30 s);
- network cut: node2's interface goes down, its processes keep running, and Slurm's own detection
  (SlurmdTimeout=10) declares it down after ~25-30 s; no fast path.

In both Slurm requeues the batch job. The rerun waits out Slurm's requeue delay (cred_expire + 1 s = 11 s
here; forced earlier, slurmctld may still be settling the old run with the node that came back, and the
rerun's step never starts); ``scontrol update StartTime=now`` then skips only the scheduler's cadence.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.cluster.jobs import (
    ENDED,
    TINY,
    final_delta,
    load_final_delta,
    run_dir_of,
    run_job,
    sbatch,
    wait_for_checkpoint,
)
from tests.cluster.multihost import HOST_IFNAME, EmulatedCluster
from tests.cluster.slurm import ClusterUnavailable
from tests.train.launch import metrics

pytestmark = pytest.mark.slow  # Slurm jobs on emulated hosts, about 10-50 s each

#: the longest variants of a scenario a shorter variant covers too; they keep the whole suite within its 20 minutes,
#: and OPENDELTA_LONG_TESTS=1 runs them
LONG = pytest.mark.skipif(
    os.environ.get("OPENDELTA_LONG_TESTS") != "1",
    reason="a longer variant of a scenario the suite runs in another variant; OPENDELTA_LONG_TESTS=1 runs it",
)

# ddp trains long enough (100 steps, ~5 s) to lose a node between its first checkpoint and its end
STEPS = {"ddp": 100, "fsdp": 20, "deepspeed": 20}
EVERY = 10


def overrides(engine: str, steps: int | None = None) -> list[str]:
    """The tiny recipe on ``engine`` with a checkpoint every EVERY steps."""
    return [*TINY, f"engine={engine}", f"train.max_steps={steps or STEPS[engine]}", f"checkpoint.every={EVERY}"]


Run = tuple[str, Path, dict[str, str]]


@pytest.fixture(scope="module")
def two_host_run(emulated_hosts: EmulatedCluster, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Run]:
    """``engine -> (job id, run directory, job info)`` of an uninterrupted 2-node x 1-process run (made once),
    with gloo told its interface (``GLOO_SOCKET_IFNAME``)."""
    submit_dir = tmp_path_factory.mktemp("two-hosts")
    done: dict[str, Run] = {}

    def run(engine: str) -> Run:
        if engine not in done:
            emulated_hosts.heal()
            # gloo on the interface named as docs/cluster.md says; the other jobs rely on the hostname's address
            interface = {"GLOO_SOCKET_IFNAME": HOST_IFNAME}
            job_id, log, info = run_job(
                emulated_hosts, submit_dir, overrides(engine), "--nodes=2", nproc_per_node=1, env=interface
            )
            assert info["JobState"] == "COMPLETED", log.read_text()[-6000:]
            done[engine] = (job_id, run_dir_of(submit_dir, job_id), info)
        return done[engine]

    return run


def assert_same_delta(run_dir: Path, reference: Path) -> None:
    """The two runs' final deltas are bit-identical."""
    ours, ref = final_delta(run_dir), final_delta(reference)
    assert ours.keys() == ref.keys() and ours
    for key in ref:
        assert torch.equal(ours[key], ref[key]), f"{key}: max difference {(ours[key] - ref[key]).abs().max()}"


# fsdp across two hosts also runs in test_a_job_requeued_on_fewer_hosts_resumes_or_says_why_not
@pytest.mark.parametrize("engine", ["ddp", pytest.param("fsdp", marks=LONG), pytest.param("deepspeed", marks=LONG)])
def test_two_hosts_train_exactly_as_one_node(hosts, two_host_run, tmp_path, engine):
    """2 nodes x 1 process and 1 node x 2 processes: the same world size, global batch and seed give
    bit-identical deltas (CPU, fp32, one thread per process; 2-rank sums are exact whatever the order)."""
    job_id, run_dir, info = two_host_run(engine)
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2"
    log = (run_dir.parents[2] / f"opendelta-{job_id}.out").read_text()
    assert "--nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d" in log
    assert f"--rdzv_endpoint=node1:{20000 + int(job_id) % 10000}" in log
    # node2's slurmd started the job's torchrun step there
    assert f"launch task StepId={job_id}.0" in (hosts.root / "log" / "slurmd-node2.log").read_text()

    one_id, one_log, one_info = run_job(hosts, tmp_path, overrides(engine), "--nodes=1", nproc_per_node=2)
    assert one_info["JobState"] == "COMPLETED", one_log.read_text()[-6000:]
    assert "--nnodes=1 --nproc_per_node=2" in one_log.read_text()
    assert_same_delta(run_dir, run_dir_of(tmp_path, one_id))
    load_final_delta(run_dir)


def _wait_requeued(hosts: EmulatedCluster, job_id: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while hosts.job(job_id).get("Restarts") != "1":
        assert time.monotonic() < deadline, f"job {job_id} was not requeued: {hosts.job(job_id)}\n{hosts.logs()}"
        time.sleep(0.3)


def _wait_ended(hosts: EmulatedCluster, job_id: str, log: Path, timeout: float = 180) -> dict[str, str]:
    """Wait for the job to end; if it does not, fail with its log, the daemons' logs and what each host runs."""
    try:
        return hosts.wait_for(job_id, ENDED, timeout=timeout)
    except TimeoutError as exc:
        text = log.read_text()[-8000:] if log.exists() else "no job log"
        pytest.fail(f"{exc}\n--- job log ---\n{text}\n{hosts.logs()}\n{hosts.snapshot()}")


def _resumed_at(text: str) -> int:
    resumed = re.search(r"resumed from \S+/step_(\d+) at step (\d+)", text)
    assert resumed, text[-6000:]
    return int(resumed.group(2))


def _old_run_gone(hosts: EmulatedCluster, job_id: str, timeout: float = 60) -> None:
    """Wait until the old run is settled everywhere: no process of it on any node, no step of it listed,
    no message of slurmctld's to a node still queued (``sdiag``: a kill for the old run delivered late
    would end the rerun, which has the same job id), and every node idle."""
    deadline = time.monotonic() + timeout
    while True:
        left = {node: hosts.host_pids(node) for node in hosts.nodes}
        for node in hosts.nodes:
            slurmd = int((hosts.root / f"slurmd-{node}.pid").read_text())
            left[node] = [p for p in left[node] if p != slurmd]
        steps = hosts.run("squeue", "-h", "-s", "-j", job_id).stdout
        queued = hosts.run("sdiag").stdout.split("Pending RPC statistics", 1)[-1].strip()
        if not any(left.values()) and not steps and queued == "No pending RPCs":
            break
        assert time.monotonic() < deadline, f"the old run is still there: {left} {steps} {queued}\n{hosts.snapshot()}"
        time.sleep(0.2)
    hosts.wait_idle(hosts.nodes, timeout=max(deadline - time.monotonic(), 5))


# network cut (~75 s) waits out Slurm's own detection of a silent node; host crash (~35 s) marks it down at once
@pytest.mark.parametrize("failure", ["host crash", pytest.param("network cut", marks=LONG)])
def test_a_lost_host_requeues_the_job_and_it_resumes_to_the_same_delta(hosts, two_host_run, tmp_path, failure):
    """node2 is lost after the first checkpoint and before the end. Host crash: every process of node2
    gets SIGKILL, the fast path marks it down, its slurmd is started again (the host reboots). Network
    cut: Slurm's own detection (~25-30 s) marks it down; the network comes back and the test waits until
    Slurm has killed the old step there. Either way the job is requeued, runs again on both nodes,
    resumes from the last complete checkpoint and ends with the uninterrupted run's delta, bit for bit."""
    _, reference, _ = two_host_run("ddp")
    job_id, log = sbatch(hosts, tmp_path, overrides("ddp"), "--nodes=2", nproc_per_node=1)
    run_dir = run_dir_of(tmp_path, job_id)
    wait_for_checkpoint(run_dir, log)
    if failure == "host crash":
        hosts.crash("node2")
        hosts.mark_down("node2")
        _wait_requeued(hosts, job_id, log, timeout=30)
        hosts.boot("node2")
    else:
        hosts.cut_network("node2")
        _wait_requeued(hosts, job_id, log, timeout=90)
        hosts.restore_network("node2")
    _old_run_gone(hosts, job_id)
    assert not (run_dir / "final_delta").exists(), "the job ended before the node was lost"
    hosts.start_when_eligible(job_id)
    info = _wait_ended(hosts, job_id, log)

    text = log.read_text()  # --open-mode=append: both runs are in it
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "node[1-2]", text[-6000:]
    assert f"job {job_id} run 2 (SLURM_RESTART_COUNT=1) on node[1-2]" in text
    assert "DUE TO NODE FAILURE" in (hosts.root / "log" / "slurmd-node1.log").read_text()
    assert EVERY <= _resumed_at(text) < STEPS["ddp"]
    assert_same_delta(run_dir, reference)


# the long tier: a stop's requeue and resume also run on one node (test_slurm_cluster: before the time limit, a
# requeued sweep job), every rank stopping at one step in tests/train/test_no_lost_work.py, and two hosts resuming
# to the same delta after a lost host here
@pytest.mark.parametrize(
    "interruption", [pytest.param("scancel --signal=USR1", marks=LONG), pytest.param("scontrol requeue", marks=LONG)]
)
def test_a_two_host_job_stopped_mid_step_resumes_to_the_same_delta(hosts, two_host_run, tmp_path, interruption):
    """Mid-run, the checkpoint signal reaches every process of the 2-node job (``scancel --signal=USR1``, as
    ``--signal=USR1@120`` sends it before the time limit), or Slurm requeues it (``scontrol requeue``: SIGTERM
    to every process, as a preemption). Every rank stops at the same step, writes one checkpoint there and
    exits; the job runs again (requeued by the run itself, or by Slurm), resumes from exactly that step and
    ends with the uninterrupted run's delta, bit for bit, every step logged once."""
    _, reference, _ = two_host_run("ddp")
    job_id, log = sbatch(hosts, tmp_path, overrides("ddp"), "--nodes=2", nproc_per_node=1)
    run_dir = run_dir_of(tmp_path, job_id)
    wait_for_checkpoint(run_dir, log)
    hosts.run(*interruption.split(), job_id)
    _wait_requeued(hosts, job_id, log, timeout=60)
    _old_run_gone(hosts, job_id)
    assert not (run_dir / "final_delta").exists(), "the job ended before it was stopped"
    hosts.start_when_eligible(job_id)
    info = _wait_ended(hosts, job_id, log)

    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "node[1-2]", text[-6000:]
    name = "SIGUSR1" if "USR1" in interruption else "SIGTERM"
    stop = re.search(rf"stopped at step (\d+) on {name} \(received by rank \d\): checkpoint \S+/step_(\d+)", text)
    assert stop and int(stop.group(1)) == int(stop.group(2)), text[-6000:]
    if name == "SIGUSR1":
        assert f"requeued job {job_id}: its next run continues from this checkpoint" in text
    assert _resumed_at(text) == int(stop.group(1)) < STEPS["ddp"]
    assert [r["step"] for r in metrics(run_dir)] == [r["step"] for r in metrics(reference)]  # each logged once
    assert_same_delta(run_dir, reference)


def _shrink(hosts: EmulatedCluster, job_id: str, timeout: float = 30) -> None:
    """Make the requeued job fit on one node, once it is pending again (earlier, the requeue resets it)."""
    hosts.wait_for(job_id, {"PENDING"}, timeout)
    hosts.run("scontrol", "update", f"JobId={job_id}", "NumNodes=1", "NumTasks=1")
    assert hosts.job(job_id)["NumTasks"] == "1"


# DeepSpeed's refusal to resume on fewer processes is also tested without Slurm (test_engine_seam.py)
@pytest.mark.parametrize("engine", ["fsdp", pytest.param("deepspeed", marks=LONG)])
def test_a_job_requeued_on_fewer_hosts_resumes_or_says_why_not(hosts, tmp_path, engine):
    """2 nodes x 2 processes (world size 4); node2 crashes (fast path) and stays down, and the requeued
    job is shrunk to the one node left (``scontrol update JobId=J NumNodes=1 NumTasks=1``): 2 processes.
    FSDP's checkpoint holds whole tensors and resumes on 2; DeepSpeed's optimizer state is partitioned
    for 4 ranks, and the run refuses, naming why."""
    steps = 24
    job_id, log = sbatch(hosts, tmp_path, overrides(engine, steps), "--nodes=2", nproc_per_node=2)
    run_dir = run_dir_of(tmp_path, job_id)
    first = wait_for_checkpoint(run_dir, log, timeout=180)
    assert json.loads((first / "trainer_state.json").read_text())["world_size"] == 4
    hosts.crash("node2")
    hosts.mark_down("node2")
    _wait_requeued(hosts, job_id, log, timeout=30)
    assert not (run_dir / "final_delta").exists(), "the job ended before the node was lost"
    _shrink(hosts, job_id)
    hosts.start_when_eligible(job_id)
    info = _wait_ended(hosts, job_id, log)

    text = log.read_text()
    assert f"job {job_id} run 2 (SLURM_RESTART_COUNT=1) on node1" in text, text[-6000:]
    assert "--nnodes=1 --nproc_per_node=2" in text
    if engine == "fsdp":
        assert info["JobState"] == "COMPLETED", text[-6000:]
        assert EVERY <= _resumed_at(text) < steps
        last = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
        assert json.loads((last / "trainer_state.json").read_text())["world_size"] == 2
        load_final_delta(run_dir)
    else:
        assert info["JobState"] == "FAILED", text[-6000:]
        assert "optimizer state is partitioned for 4 ranks and this run has 2" in text


def test_teardown_leaves_nothing_behind(tmp_path):
    """Three hosts, a job on all of them and a stray process outside Slurm: stop() ends every process by
    pid and removes every namespace, veth and the bridge."""
    try:
        cluster = EmulatedCluster.start(tmp_path / "hosts", hosts=3)
    except ClusterUnavailable as exc:
        pytest.skip(f"no emulated hosts: {exc}")
    try:
        out = cluster.run("srun", "-N3", "--ntasks-per-node=1", "hostname").stdout.split()
        assert sorted(out) == ["node1", "node2", "node3"]
        stray = subprocess.Popen(cluster.on("node2", ["sleep", "600"]), start_new_session=True)
        deadline = time.monotonic() + 10
        while len(cluster.host_pids("node2")) < 2:  # slurmd and the stray sleep
            assert time.monotonic() < deadline
            time.sleep(0.05)
        names = [cluster.namespace(h) for h in cluster.addresses]
    finally:
        cluster.stop()
    assert cluster.leftovers() == []
    assert stray.wait(timeout=10) != 0  # killed
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)


def test_missing_tools_are_named(tmp_path, monkeypatch):
    """Where a tool is missing the cluster does not start and says which, and how to install it."""
    if os.geteuid() != 0:
        pytest.skip("not root: the cluster refuses before it looks for tools")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ClusterUnavailable, match=r"missing: bash scripts/system-deps.sh"):
        EmulatedCluster.start(tmp_path / "hosts")
