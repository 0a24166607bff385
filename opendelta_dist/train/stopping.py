"""Stopping early without losing a step: on a signal, or before the job's time limit.

The signal handlers only note that a signal came (they may run mid-backward or mid-collective, where no
file and no collective is safe). The ranks then agree, at fixed points every rank reaches in the same
order, whether to stop: after every optimizer step, and before every evaluation batch. Each rank brings
what it saw to one ``all_reduce(MAX)`` (:meth:`Stopper.poll`), so a signal that reached a single rank
stops them all at the same step. The recipe then writes one checkpoint there, collectively, and exits;
``resume=auto`` (added by the Slurm script, implied on a torchrun restart) continues from it.

Signals handled:

- ``SIGTERM``: sent by Slurm to every process of a job that is cancelled, requeued, preempted or at its
  time limit, by torchrun to its workers when it stops, by ``docker stop`` and Kubernetes. The run
  checkpoints and exits (status 143). Under Slurm, a SIGTERM at the job's end time means the time limit:
  the run asks for the job to be requeued. Any other SIGTERM is someone else's decision (a requeue or a
  preemption is requeued by Slurm, a cancel must stay cancelled).
- ``checkpoint.signal`` (``USR1`` by default; ``null`` turns it off): "checkpoint and make way". The run
  checkpoints, and under Slurm requeues its job (``scontrol requeue``, at most ``checkpoint.max_requeues``
  times), then exits (status 128 + the signal's number). ``launch/slurm/train.sbatch`` has Slurm send it
  before the time limit (``--signal``); ``scancel --signal=USR1 <job>`` sends it by hand.

The time limit without a signal: under Slurm the run reads its job's end time (:func:`slurm_job_end_time`)
and stops ``checkpoint.time_limit_margin`` seconds before it, then requeues the job. The margin ``auto``
is measured as the run goes: 1.5 x (the slowest of the last steps + the slowest checkpoint write) + 10 s,
with a checkpoint write taken as 30 s until one is measured.

A second signal while the checkpoint is written only notes itself again: the checkpoint completes.
Ctrl-C (SIGINT) is not one of these: it stops at once (see the recipe's ``run``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from opendelta_dist.errors import DeltaConfigError, OpenDeltaError

#: the time a checkpoint write is assumed to take until the run has measured one
UNMEASURED_CHECKPOINT_S = 30.0
#: a SIGTERM at the job's end time (or after it), give or take this much clock skew, is Slurm's time limit
#: (slurmctld sends it once the end time has passed); an earlier one is a cancel, requeue or preemption
TIME_LIMIT_SIGTERM_WINDOW_S = 5.0
#: how often rank 0 asks Slurm for its job's end time again (a time limit can change while the job runs)
END_TIME_REFRESH_S = 300.0
#: the signals that can be the checkpoint signal: the user signals and SIGHUP (others mean something else:
#: SIGCHLD comes with every child process that ends, SIGSEGV with a crash)
_CHECKPOINT_SIGNALS = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP}


#: For the recovery tests: ``RANK:STEP:PHASE:SIGNAL[,...]`` makes the process of that rank send itself the
#: signal at that point (phases: ``setup``, ``step`` (mid-step, after the first backward), ``eval`` (after
#: the first evaluation batch), ``checkpoint`` (between the delta and the optimizer state of a checkpoint).
SIGNAL_AT_ENV = "OPENDELTA_DIST_SIGNAL_AT"


def drill(rank: int, step: int, phase: str) -> None:
    """Send this process the signals :data:`SIGNAL_AT_ENV` names for ``rank``, ``step`` and ``phase``."""
    spec = os.environ.get(SIGNAL_AT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        at_rank, at_step, at_phase, name = item.split(":")
        if (int(at_rank), int(at_step), at_phase) == (rank, step, phase):
            os.kill(os.getpid(), signal.Signals[name if name[:3] == "SIG" else f"SIG{name}"])


class RunStopped(OpenDeltaError):
    """The run stopped early, on a signal or before the time limit, after writing a checkpoint.

    Attributes:
        exit_status: the process's exit status: 128 + the signal's number, or 124 for the time limit.
    """

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def parse_signal(name: Any) -> signal.Signals | None:
    """The checkpoint signal from its configured name (``USR1``, ``SIGUSR2``, ``10``), or None (off).

    Raises:
        DeltaConfigError: not a signal, or not one of USR1, USR2, HUP.
    """
    if name in (None, "", "none", "null", False):
        return None
    text = str(name).strip().upper()
    try:
        sig = (
            signal.Signals(int(text)) if text.isdigit() else signal.Signals[text if text[:3] == "SIG" else f"SIG{text}"]
        )
    except (KeyError, ValueError):
        raise DeltaConfigError(
            f"checkpoint.signal={name!r} is not a signal; set e.g. checkpoint.signal=USR1 (or USR2, HUP), or "
            "checkpoint.signal=null"
        ) from None
    if sig not in _CHECKPOINT_SIGNALS:
        why = "SIGTERM is always handled" if sig == signal.SIGTERM else "it cannot be the checkpoint signal"
        raise DeltaConfigError(f"checkpoint.signal={name!r}: {why}; choose USR1, USR2 or HUP")
    return sig


def parse_margin(value: Any) -> float | None:
    """``checkpoint.time_limit_margin``: ``"auto"`` (-1.0 here), seconds, or None (no time-limit stop).

    Raises:
        DeltaConfigError: neither ``auto``, null nor a number of seconds >= 0.
    """
    if value in (None, "none", "null"):
        return None
    if value == "auto":
        return -1.0
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    raise DeltaConfigError(
        f"checkpoint.time_limit_margin={value!r}: the seconds before the job's time limit at which the run "
        "checkpoints must be auto, a number >= 0, or null; set e.g. checkpoint.time_limit_margin=auto"
    )


def slurm_job_end_time() -> float | None:
    """The Unix time at which Slurm ends this job, or None (outside Slurm, or no time limit).

    ``squeue -h -j $SLURM_JOB_ID -o %e`` (in ISO form, whatever ``SLURM_TIME_FORMAT`` the user set), which
    also sees a time limit changed while the job runs; ``SLURM_JOB_END_TIME`` (set by newer Slurm at the
    job's start) where squeue cannot answer.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        try:
            env = {**os.environ, "SLURM_TIME_FORMAT": "standard"}
            out = subprocess.run(
                ["squeue", "-h", "-j", job, "-o", "%e"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                env=env,
            ).stdout.strip()
            return datetime.fromisoformat(out).timestamp()
        except (OSError, subprocess.TimeoutExpired, ValueError):
            pass  # no squeue here, or no end time (NONE, Unknown)
    try:
        end = float(os.environ["SLURM_JOB_END_TIME"])
    except (KeyError, ValueError):
        return None
    return end if end > 0 else None


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes for this job (``<array job>_<task>`` for an array task)."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or None


@dataclass(frozen=True)
class StopReason:
    """Why the ranks agreed to stop.

    Attributes:
        kind: ``"signal"`` or ``"time limit"``.
        signal: the signal, for ``"signal"``.
        rank: a rank that received it (the highest), or 0 for the time limit.
        detail: for the time limit, the end time and margin.
    """

    kind: str
    signal: signal.Signals | None = None
    rank: int = 0
    detail: str = ""

    def __str__(self) -> str:
        if self.kind == "signal" and self.signal is not None:
            return f"{self.signal.name} (received by rank {self.rank})"
        return f"the job's time limit ({self.detail})"

    @property
    def exit_status(self) -> int:
        """128 + the signal's number, as a process killed by it; 124 for the time limit."""
        return 128 + int(self.signal) if self.signal is not None else 124


class Stopper:
    """Notes signals, watches the job's end time, and makes the ranks agree on when to stop.

    Args:
        rank: this process's rank.
        device: where the vote's tensor lives (the process group's device).
        checkpoint_signal: :func:`parse_signal`'s result.
        margin: :func:`parse_margin`'s result.
        max_requeues: how many times the run may requeue its Slurm job (``SLURM_RESTART_COUNT`` counts them).
        end_time: the job's end time (Unix seconds); by default Slurm's (:func:`slurm_job_end_time`), read by
            rank 0 and again every :data:`END_TIME_REFRESH_S`.
        clock: the wall clock (tests pass their own).
    """

    def __init__(
        self,
        rank: int,
        device: torch.device,
        checkpoint_signal: signal.Signals | None = signal.SIGUSR1,
        margin: float | None = -1.0,
        max_requeues: int = 20,
        end_time: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rank, self.device = rank, device
        self.checkpoint_signal = checkpoint_signal
        self.signals = [signal.SIGTERM] + ([checkpoint_signal] if checkpoint_signal is not None else [])
        self.margin_setting = margin
        self.max_requeues = max_requeues
        self.clock = clock
        self._ask_slurm = end_time is None and rank == 0 and slurm_job_id() is not None
        self.end_time = slurm_job_end_time() if self._ask_slurm else end_time
        self._end_read_at = clock()
        self.received: dict[signal.Signals, float] = {}
        self.reason: StopReason | None = None
        self._steps: deque[float] = deque(maxlen=20)
        self._checkpoint_s: float | None = None
        self._previous: dict[signal.Signals, Any] = {}

    # -------------------------------------------------------------- signals

    def _note(self, signum: int, frame: FrameType | None) -> None:
        # a flag and the time, nothing else: this may run in the middle of a backward or a collective
        self.received.setdefault(signal.Signals(signum), self.clock())

    def install(self) -> None:
        """Handle the signals in this process (main thread). :meth:`uninstall` restores the previous handlers."""
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._note)

    def uninstall(self) -> None:
        """Restore the handlers :meth:`install` replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    # -------------------------------------------------------------- time limit

    def record_step(self, seconds: float) -> None:
        """Note how long an optimizer step took (for the margin)."""
        self._steps.append(seconds)

    def record_checkpoint(self, seconds: float) -> None:
        """Note how long a checkpoint write took (for the margin)."""
        self._checkpoint_s = max(self._checkpoint_s or 0.0, seconds)

    def margin(self) -> float | None:
        """The seconds before the end time at which the run stops; None: no time-limit stop."""
        if self.margin_setting is None or self.margin_setting >= 0:
            return self.margin_setting
        step = max(self._steps, default=0.0)
        write = self._checkpoint_s if self._checkpoint_s is not None else UNMEASURED_CHECKPOINT_S
        return 1.5 * (step + write) + 10.0

    def _deadline_reached(self) -> bool:
        if self._ask_slurm and self.clock() - self._end_read_at >= END_TIME_REFRESH_S:
            self.end_time, self._end_read_at = slurm_job_end_time(), self.clock()
        margin = self.margin()
        return self.end_time is not None and margin is not None and self.clock() >= self.end_time - margin

    # -------------------------------------------------------------- the vote

    def poll(self) -> StopReason | None:
        """Whether to stop now; collective: every rank calls it at the same points, in the same order.

        Returns:
            Why the ranks stop (the same on every rank), or None. Once a stop is agreed it stays agreed.
        """
        if self.reason is not None:
            return self.reason
        mine = [
            float(self.rank + 1) if signal.SIGTERM in self.received else 0.0,
            float(self.rank + 1) if self.checkpoint_signal in self.received else 0.0,
            1.0 if self._deadline_reached() else 0.0,
        ]
        votes = mine
        if dist.is_initialized() and dist.get_world_size() > 1:
            tensor = torch.tensor(mine, dtype=torch.float64, device=self.device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            votes = tensor.tolist()
        term, checkpoint, deadline = votes
        if term:
            self.reason = StopReason("signal", signal.SIGTERM, int(term) - 1)
        elif checkpoint:
            self.reason = StopReason("signal", self.checkpoint_signal, int(checkpoint) - 1)
        elif deadline:
            self.reason = StopReason("time limit", detail=self._deadline_detail())
        return self.reason

    def _deadline_detail(self) -> str:
        if self.end_time is None:
            return "end time unknown"
        margin = self.margin()
        end = time.strftime("%H:%M:%S", time.localtime(self.end_time))
        return f"the job ends at {end}, {self.end_time - self.clock():.0f} s from now; margin {margin:.0f} s"

    # -------------------------------------------------------------- after the checkpoint

    def wants_requeue(self) -> bool:
        """Whether the stop asks for the Slurm job to run again: the checkpoint signal, the time limit, or a
        SIGTERM at the job's end time (Slurm's time limit)."""
        reason = self.reason
        if reason is None or slurm_job_id() is None:
            return False
        if reason.kind == "time limit" or reason.signal == self.checkpoint_signal:
            return True
        term_at = self.received.get(signal.SIGTERM)
        end = self.end_time if self.end_time is not None else slurm_job_end_time()
        return term_at is not None and end is not None and term_at >= end - TIME_LIMIT_SIGTERM_WINDOW_S

    def requeue(self) -> str:
        """Ask Slurm to run this job again (rank 0, once every rank has finished the checkpoint).

        Returns:
            What happened, for the run's log.
        """
        job = slurm_job_id()
        done = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if done >= self.max_requeues:
            return (
                f"not requeueing job {job}: it was requeued {done} times (checkpoint.max_requeues="
                f"{self.max_requeues}); resubmit it to continue (resume=auto)"
            )
        try:
            result = subprocess.run(
                ["scontrol", "requeue", str(job)], capture_output=True, text=True, timeout=60, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"could not requeue job {job} ({error}); resubmit it to continue (resume=auto)"
        if result.returncode != 0:
            why = (result.stderr or result.stdout).strip()
            return f"scontrol requeue {job} failed ({why}); resubmit it to continue (resume=auto)"
        return f"requeued job {job}: its next run continues from this checkpoint"
