"""No lost or mixed work, end to end through launch/train.py: a signal at any rank and at any point stops
every rank at one step with one checkpoint, and the resumed run ends with the uninterrupted run's delta,
bit for bit, every step logged once; Ctrl-C is one line; a run directory holds one run; a sweep point
trains in its own; a damaged checkpoint is set aside; a full disk stops the run and keeps the last
checkpoint. (Signals come from the processes themselves at fixed points: ``OPENDELTA_DIST_SIGNAL_AT``.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opendelta_dist.train.stopping import SIGNAL_AT_ENV
from tests.train.launch import ROOT, check, launch, metrics, python_path

pytestmark = pytest.mark.slow
#: 16 steps, a checkpoint every 4, an evaluation every 6 of 4 batches per rank
RUN = [
    "+recipe=lora_t5_tiny",
    "train.max_steps=16",
    "checkpoint.every=4",
    "train.log_every=1",
    "train.eval_every=6",
    "train.eval_batch_size=8",
]


def _delta(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final_delta" / "delta_model.safetensors")


def assert_same_delta(run_dir: Path, reference: Path) -> None:
    ours, ref = _delta(run_dir), _delta(reference)
    assert ours.keys() == ref.keys() and ours
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key


def assert_logged_once(run_dir: Path) -> None:
    """Every step's training row once, the evaluations of steps 6, 12 and the final one once."""
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 17))
    assert [r["step"] for r in metrics(run_dir, "eval")] == [6, 12, 16]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run, 2 processes."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    check(launch([*RUN, f"run_dir={run_dir}"]))
    assert_logged_once(run_dir)
    return run_dir


def test_a_signal_at_one_rank_mid_step_stops_every_rank_there_and_a_damaged_checkpoint_is_set_aside(
    reference, tmp_path
):
    run_dir = tmp_path / "run"
    stopped = launch([*RUN, f"run_dir={run_dir}"], env={SIGNAL_AT_ENV: "1:5:step:USR1"})
    assert stopped.returncode != 0
    line = f"stopped at step 5 on SIGUSR1 (received by rank 1): checkpoint {run_dir}/checkpoints/step_00000005"
    assert line in stopped.stdout, stopped.stdout[-3000:]
    assert stopped.stderr.count(f"exitcode  : {128 + signal.SIGUSR1}") == 2  # both ranks, the same stop
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000004", "step_00000005"]

    # the newest checkpoint is damaged: resume=auto names it, sets it aside and takes the one before
    state = run_dir / "checkpoints" / "step_00000005" / "training_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    resumed = launch([*RUN, f"run_dir={run_dir}", "resume=auto"])
    check(resumed)
    assert "training_state.pt does not match its SHA-256" in resumed.stdout
    assert "set aside as step_00000005.damaged" in resumed.stdout
    assert f"resumed from {run_dir}/checkpoints/step_00000004 at step 4" in resumed.stdout
    assert (run_dir / "checkpoints" / "step_00000005.damaged").is_dir()
    assert_same_delta(run_dir, reference)
    assert_logged_once(run_dir)


def test_sigterm_during_an_evaluation_and_again_during_the_save(reference, tmp_path):
    """Rank 0 is signalled in the evaluation of step 6; during the checkpoint both ranks get another signal.
    The evaluation is abandoned, the checkpoint records it as pending, and the resumed run runs it first."""
    run_dir = tmp_path / "run"
    drill = "0:6:eval:TERM,1:6:checkpoint:TERM,0:6:checkpoint:USR1"
    stopped = launch([*RUN, f"run_dir={run_dir}"], env={SIGNAL_AT_ENV: drill})
    assert "stopped at step 6 on SIGTERM (received by rank 0)" in stopped.stdout, stopped.stdout[-3000:]
    assert stopped.stderr.count(f"exitcode  : {128 + signal.SIGTERM}") == 2
    state = json.loads((run_dir / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["pending_eval"] is True and state["step"] == 6
    assert [r["step"] for r in metrics(run_dir, "eval")] == []

    resumed = launch([*RUN, f"run_dir={run_dir}", "resume=auto"])
    check(resumed)
    assert_same_delta(run_dir, reference)
    assert_logged_once(run_dir)


def test_a_signal_during_set_up_stops_before_the_first_step(tmp_path):
    run_dir = tmp_path / "run"
    stopped = launch(
        ["+recipe=lora_t5_tiny", "engine=single", f"run_dir={run_dir}"], nproc=0, env={SIGNAL_AT_ENV: "0:0:setup:TERM"}
    )
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "stopped on SIGTERM (received by rank 0) before the first step: nothing to save" in stopped.stdout
    assert not (run_dir / "checkpoints").exists()


def test_ctrl_c_says_where_the_run_stopped_in_one_line(tmp_path):
    """SIGINT to torchrun's process group, as a terminal sends it: one line from rank 0; the only traceback
    left is torchrun's own (its SignalException)."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(ROOT / "launch" / "train.py"), *RUN, "train.max_steps=400", f"run_dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": python_path(), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    log, deadline = run_dir / "metrics.jsonl", time.monotonic() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) >= 7):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0
    lines = [line for line in output.splitlines() if line.startswith("interrupted (Ctrl-C) at step")]
    assert len(lines) == 1, output[-4000:]
    assert f"the last checkpoint is {run_dir}/checkpoints/step_00000004: the same command with resume=auto" in lines[0]
    assert output.count("Traceback") == 1 and "SignalException" in output, output[-4000:]


def test_a_run_directory_holds_one_run(tmp_path):
    run_dir = tmp_path / "run"
    base = ["+recipe=lora_t5_tiny", "engine=single", "train.max_steps=4", "train.log_every=1", f"run_dir={run_dir}"]
    check(launch(base, nproc=0))
    first = _delta(run_dir)
    assert json.loads((run_dir / "result.json").read_text())["step"] == 4

    again = launch([*base, "optim.lr=0.5"], nproc=0)
    assert again.returncode == 1
    assert f"run_dir={run_dir} holds a run already (config.json, metrics.jsonl, train.log, result.json" in again.stderr
    assert "Continue it with resume=auto, replace it with overwrite_run_dir=true" in again.stderr

    done = launch([*base, "resume=auto"], nproc=0)
    check(done)
    assert f"{run_dir} holds a run that finished at step 4 (train.max_steps=4)" in done.stdout
    assert "nothing to do" in done.stdout
    assert all(torch.equal(_delta(run_dir)[k], v) for k, v in first.items())  # untouched

    (run_dir / "notes.txt").write_text("not the run's")
    replaced = launch([*base, "optim.lr=0.5", "overwrite_run_dir=true"], nproc=0)
    check(replaced)
    assert "overwrite_run_dir=true: deleting the run in" in replaced.stdout
    assert (run_dir / "notes.txt").read_text() == "not the run's"
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]  # the new run's rows only
    assert json.loads((run_dir / "config.json").read_text())["optim"]["lr"] == 0.5

    past = launch([*base, "train.max_steps=2", "resume=auto", "checkpoint.every=1"], nproc=0)
    assert "finished at step 4 (train.max_steps=2)" in past.stdout


def test_each_point_of_a_local_sweep_trains_in_its_own_directory(tmp_path):
    sweep = tmp_path / "sweep"
    command = [sys.executable, str(ROOT / "launch" / "train.py"), "-m", "+recipe=lora_t5_tiny", "engine=single"]
    command += ["train.max_steps=2", "optim.lr=1e-3,1e-2", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "PYTHONPATH": python_path(), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    check(result)
    for point, lr in (("0", 1e-3), ("1", 1e-2)):
        assert json.loads((sweep / point / "config.json").read_text())["optim"]["lr"] == lr
        assert (sweep / point / "final_delta" / "delta_model.safetensors").is_file()
        assert [r["step"] for r in metrics(sweep / point)] == [2]
    low, high = _delta(sweep / "0"), _delta(sweep / "1")
    assert any(not torch.equal(low[k], high[k]) for k in low)  # two deltas, not one written twice


def test_a_full_disk_stops_the_run_and_keeps_the_last_checkpoint(small_disk):
    """On a real 2 MiB filesystem: a run of 8 steps leaves checkpoints 4 and 8 (about 0.5 MiB each). Given
    more steps with the disk filled, the checkpoint of step 12 does not fit: the run stops naming the path
    and the sizes, and leaves checkpoint 8 intact; with space again, resume=auto continues from it."""
    run_dir = small_disk / "run"
    base = ["+recipe=lora_t5_tiny", "engine=single", "checkpoint.every=4", "train.log_every=1", f"run_dir={run_dir}"]
    check(launch([*base, "train.max_steps=8"], nproc=0))
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (free - 200_000))  # 0.2 MB left: the logs fit, a checkpoint does not

    full = launch([*base, "train.max_steps=16", "resume=auto"], nproc=0)
    assert full.returncode == 1
    assert "CheckpointSpaceError" in full.stderr and str(run_dir / "checkpoints") in full.stderr, full.stderr[-3000:]
    assert "MB needed" in full.stderr and "MB free" in full.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000004", "step_00000008"]

    filler.unlink()
    resumed = launch([*base, "train.max_steps=16", "resume=auto"], nproc=0)
    check(resumed)
    assert f"resumed from {run_dir}/checkpoints/step_00000008 at step 8" in resumed.stdout
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 17))
