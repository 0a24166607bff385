"""How long a run takes from a stop signal to its checkpoint, and to its exit.

Each recipe runs under torchrun (2 CPU processes, through ``launch/slurm/torchrun.py`` as Slurm jobs do),
with no periodic checkpoint. Once it has trained ``--warmup`` steps, SIGUSR1 goes to every process at once
(torchrun and each worker), as Slurm's ``--signal`` and ``scancel --signal`` send it. Measured from the
signal: the moment the checkpoint is complete (its ``trainer_state.json``, written last, appears) and the
moment the launcher has exited. The step time is the rate of ``metrics.jsonl`` rows before the signal
(``train.log_every=1``). The ratio ``signal to checkpoint / step time`` is what a stop costs in steps:
the rest of the step in flight, the ranks' agreement, and the checkpoint write.

    python benchmarks/stop_latency.py                      # the tiny recipe and the SST-2 one, 3 stops each
    python benchmarks/stop_latency.py --recipes lora_t5_tiny --repeats 5

Writes benchmarks/results/stop_latency.json (machine, date, every measurement, medians).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info  # noqa: E402

RECIPES = {
    "lora_t5_tiny": ["+recipe=lora_t5_tiny", "train.max_steps=100000"],
    # 2 x 16 examples of max length 64 per step on all-MiniLM-L6-v2: the recipe's own shapes
    "lora_minilm_sst2": ["+recipe=lora_minilm_sst2", "train.max_steps=2000", "data.max_train_rows=null"],
}


def _rows(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except OSError:
        return 0


def measure(recipe: str, warmup: int) -> dict[str, Any]:
    """One stop of one recipe: returns the step time and the latencies in seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        command = [sys.executable, str(ROOT / "launch" / "slurm" / "torchrun.py"), "--standalone"]
        command += ["--nproc_per_node=2", str(ROOT / "launch" / "train.py"), *RECIPES[recipe]]
        command += ["train.log_every=1", "train.eval_every=0", "checkpoint.every=0", f"run_dir={run_dir}"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        metrics = run_dir / "metrics.jsonl"
        while _rows(metrics) < 2:
            if process.poll() is not None:
                raise RuntimeError(f"{recipe} ended before training (exit status {process.returncode})")
            time.sleep(0.01)
        first, started = _rows(metrics), time.perf_counter()
        while _rows(metrics) < first + warmup:
            time.sleep(0.01)
        step_s = (time.perf_counter() - started) / (_rows(metrics) - first)
        workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        sent = time.perf_counter()
        for pid in [process.pid, *map(int, workers)]:  # torchrun starts each worker in a session of its own
            os.kill(pid, signal.SIGUSR1)
        checkpoint_s = None
        while process.poll() is None or checkpoint_s is None:
            if checkpoint_s is None and any((run_dir / "checkpoints").glob("step_*/trainer_state.json")):
                checkpoint_s = time.perf_counter() - sent
            if process.poll() is not None and checkpoint_s is None:
                raise RuntimeError(f"{recipe} exited without a checkpoint (exit status {process.returncode})")
            time.sleep(0.002)
        exit_s = time.perf_counter() - sent
        (checkpoint,) = (run_dir / "checkpoints").glob("step_*")
        size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
        return {
            "step_s": step_s,
            "signal_to_checkpoint_s": checkpoint_s,
            "signal_to_exit_s": exit_s,
            "checkpoint_bytes": size,
            "stopped_at_step": int(checkpoint.name.split("_")[1]),
            "exit_status": process.returncode,
        }


def main() -> None:
    """Measure, print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=20, help="steps timed before the signal")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stop_latency.json")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    for recipe in args.recipes:
        runs = [measure(recipe, args.warmup) for _ in range(args.repeats)]
        med = {
            key: statistics.median(r[key] for r in runs)
            for key in ("step_s", "signal_to_checkpoint_s", "signal_to_exit_s")
        }
        med["checkpoint_in_steps"] = med["signal_to_checkpoint_s"] / med["step_s"]
        results[recipe] = {"median": med, "runs": runs}
        print(
            f"{recipe}: step {med['step_s']:.3f} s; signal to checkpoint {med['signal_to_checkpoint_s']:.2f} s "
            f"({med['checkpoint_in_steps']:.1f} steps), to exit {med['signal_to_exit_s']:.2f} s"
        )
    record = {
        "benchmark": "stop_latency",
        "machine": machine_info(),
        "config": {
            "processes": 2,
            "launcher": "launch/slurm/torchrun.py (torchrun leaving SIGUSR1 to the workers)",
            "signal": "SIGUSR1 to torchrun and every worker at once, as Slurm's --signal sends it",
            "recipes": {r: RECIPES[r] for r in args.recipes},
            "warmup_steps": args.warmup,
            "repeats": args.repeats,
        },
        "results": results,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
