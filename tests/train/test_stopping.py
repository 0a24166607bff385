"""The parts of "no lost or mixed work" that need no training run: the run directory's rules, the signal
and time-limit logic, and the ranks' vote (2 gloo processes). End to end: tests/train/test_no_lost_work.py."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train import rundir
from opendelta_dist.train.stopping import (
    UNMEASURED_CHECKPOINT_S,
    Stopper,
    StopReason,
    parse_margin,
    parse_signal,
)
from tests.train.distributed import run_distributed

CPU = torch.device("cpu")


# ---------------------------------------------------------------- run directory


def test_a_new_run_is_refused_where_a_run_is_and_told_the_three_ways_on(tmp_path):
    run_dir = tmp_path / "run"
    rundir.check_run_dir_free(run_dir, None, False)  # nothing there yet
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    rundir.check_run_dir_free(run_dir, None, False)  # files that are not a run's do not count
    (run_dir / "metrics.jsonl").write_text("")
    (run_dir / "checkpoints").mkdir()
    with pytest.raises(DeltaConfigError) as refused:
        rundir.check_run_dir_free(run_dir, None, False)
    message = str(refused.value)
    assert "holds a run already (metrics.jsonl, checkpoints)" in message
    assert "resume=auto" in message and "overwrite_run_dir=true" in message and f"run_dir={run_dir}-2" in message
    rundir.check_run_dir_free(run_dir, "auto", False)
    rundir.check_run_dir_free(run_dir, None, True)


def test_overwrite_deletes_only_what_runs_write(tmp_path):
    for name in ("config.json", "train.log", "result.json", "wandb-run-id"):
        (tmp_path / name).write_text("x")
    for name in ("checkpoints/step_00000004", "final_delta", "tensorboard"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "data.jsonl").write_text("keep")
    rundir.clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_resume_setting(monkeypatch, tmp_path):
    for var in ("TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "SLURM_RESTART_COUNT", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    assert rundir.resume_setting({"resume": None}, tmp_path) is None
    assert rundir.resume_setting({"resume": "auto"}, tmp_path) == "auto"
    with pytest.raises(DeltaConfigError, match="choose one of them"):
        rundir.resume_setting({"resume": "auto", "overwrite_run_dir": True}, tmp_path)
    # a restart continues its run, from the newest checkpoint, only where this launch ran before
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert rundir.resume_setting({"resume": None}, tmp_path) is None  # another launch's directory
    lock = rundir.claim(tmp_path)
    try:
        assert rundir.resume_setting({"resume": None}, tmp_path) == "auto"
        assert rundir.resume_setting({"resume": "/elsewhere/step_00000400"}, tmp_path) == "auto"
        with pytest.raises(DeltaConfigError, match=r"is in use by a live run \(pid \d+ on "):
            rundir.claim(tmp_path)  # a second live run
    finally:
        lock.close()
    rundir.claim(tmp_path).close()  # free again once the first is gone


def test_a_checkpoint_of_another_directory_starts_a_new_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(DeltaConfigError, match="holds a run already"):
        rundir.check_run_dir_free(tmp_path, "/elsewhere/checkpoints/step_00000004", False)
    rundir.check_run_dir_free(tmp_path, str(tmp_path / "checkpoints" / "step_00000004"), False)


def _rows(path):
    return [(r["split"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]


def test_a_resumed_run_drops_the_rows_it_logs_again(tmp_path):
    rows = [("train", s) for s in range(1, 9)] + [("eval", 4), ("eval", 8)]
    rows.sort(key=lambda r: (r[1], r[0] == "eval"))
    text = "".join(json.dumps({"split": a, "step": s, "loss": 1.0}) + "\n" for a, s in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '{"split": "train", "st')  # a line cut short
    assert rundir.truncate_metrics(tmp_path, 6, final_eval_due=False) == 4  # train 7, 8, eval 8, the cut line
    assert _rows(tmp_path / "metrics.jsonl") == [(a, s) for a, s in rows if s <= 6]
    # at the last step, its (final) evaluation runs again
    (tmp_path / "metrics.jsonl").write_text(text)
    rundir.truncate_metrics(tmp_path, 8, final_eval_due=True)
    assert _rows(tmp_path / "metrics.jsonl") == [r for r in rows if r != ("eval", 8)]


def test_changed_settings_are_named():
    old = {"optim": {"lr": 0.01, "betas": [0.9, 0.999]}, "resume": None}
    new = {"optim": {"lr": 1e6, "betas": [0.9, 0.999]}, "resume": "auto", "seed": 1}
    assert rundir.changed_settings(old, new, ignore=("resume",)) == ["optim.lr: 0.01 -> 1000000.0", "seed: None -> 1"]


# ---------------------------------------------------------------- signals and the time limit


@pytest.mark.parametrize(
    ("name", "expected"), [("USR1", signal.SIGUSR1), ("sigusr2", signal.SIGUSR2), ("1", signal.SIGHUP)]
)
def test_parse_signal(name, expected):
    assert parse_signal(name) == expected
    assert parse_signal(None) is None


@pytest.mark.parametrize("name", ["KILL", "INT", "TERM", "CHLD", "SEGV", "USR3", "twelve"])
def test_parse_signal_refuses(name):
    with pytest.raises(DeltaConfigError, match=r"checkpoint\.signal"):
        parse_signal(name)


def test_parse_margin():
    assert parse_margin("auto") == -1.0 and parse_margin(120) == 120.0 and parse_margin(None) is None
    for bad in (-5, "soon", True):
        with pytest.raises(DeltaConfigError, match="time_limit_margin"):
            parse_margin(bad)


def test_a_signal_is_noted_and_the_stop_agreed_at_the_next_poll():
    stopper = Stopper(0, CPU, signal.SIGUSR1, margin=None)
    stopper.install()
    try:
        assert stopper.poll() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second one changes nothing
        reason = stopper.poll()
    finally:
        stopper.uninstall()
    assert reason == StopReason("signal", signal.SIGUSR1, 0)
    assert reason.exit_status == 128 + signal.SIGUSR1 and str(reason) == "SIGUSR1 (received by rank 0)"
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers restored


def test_the_auto_margin_is_one_step_plus_one_checkpoint_measured():
    now = [1000.0]
    stopper = Stopper(0, CPU, None, margin=-1.0, end_time=1100.0, clock=lambda: now[0])
    assert stopper.margin() == 1.5 * UNMEASURED_CHECKPOINT_S + 10  # nothing measured yet
    stopper.record_step(2.0)
    stopper.record_step(4.0)
    stopper.record_checkpoint(6.0)
    assert stopper.margin() == 1.5 * (4.0 + 6.0) + 10  # the slowest step and write: 25 s
    now[0] = 1074.0
    assert stopper.poll() is None
    now[0] = 1075.0
    reason = stopper.poll()
    assert reason.kind == "time limit" and reason.exit_status == 124 and "margin 25 s" in str(reason)


def test_which_stops_ask_slurm_for_a_requeue(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    now = [1000.0]
    usr1 = Stopper(0, CPU, signal.SIGUSR1, margin=None, end_time=5000.0, clock=lambda: now[0])
    usr1.received[signal.SIGUSR1] = now[0]
    usr1.poll()
    assert usr1.wants_requeue()
    cancelled = Stopper(0, CPU, signal.SIGUSR1, margin=None, end_time=5000.0, clock=lambda: now[0])
    cancelled.received[signal.SIGTERM] = now[0]  # scancel, a requeue or a preemption: not ours to requeue
    cancelled.poll()
    assert not cancelled.wants_requeue()
    soon = Stopper(0, CPU, signal.SIGUSR1, margin=None, end_time=1030.0, clock=lambda: now[0])
    soon.received[signal.SIGTERM] = now[0]  # 30 s before the end: still a cancel
    soon.poll()
    assert not soon.wants_requeue()
    at_limit = Stopper(0, CPU, signal.SIGUSR1, margin=None, end_time=1002.0, clock=lambda: now[0])
    at_limit.received[signal.SIGTERM] = now[0]  # SIGTERM at the end time: Slurm's time limit
    at_limit.poll()
    assert at_limit.wants_requeue()
    monkeypatch.delenv("SLURM_JOB_ID")
    assert not usr1.wants_requeue()  # outside Slurm there is nothing to requeue


def test_requeues_are_limited(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    assert "requeued 3 times (checkpoint.max_requeues=3)" in Stopper(0, CPU, max_requeues=3, end_time=0.0).requeue()


def _vote(signalled_rank: int) -> list[tuple[str, int]]:
    """Each rank polls three times; ``signalled_rank`` alone receives SIGUSR1 before the second poll."""
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    stopper = Stopper(rank, CPU, signal.SIGUSR1, margin=None)
    stopper.install()
    seen = []
    try:
        for i in range(3):
            if i == 1 and rank == signalled_rank:
                os.kill(os.getpid(), signal.SIGUSR1)
            reason = stopper.poll()
            seen.append((str(reason) if reason else "", i))
    finally:
        stopper.uninstall()
        dist.destroy_process_group()
    return seen


def test_a_signal_at_one_rank_stops_every_rank_at_the_same_poll():
    for rank0, rank1 in (run_distributed(_vote, 1), run_distributed(_vote, 0)):
        assert rank0 == rank1
        assert [bool(reason) for reason, _ in rank0] == [False, True, True]
    assert run_distributed(_vote, 1)[0][1][0] == "SIGUSR1 (received by rank 1)"
