"""Step time and peak memory of every distributed engine against PEFT + plain DDP, on 2 CPU processes.

Run from the repository root::

    python benchmarks/engines_cpu.py                                    # every variant, 2 rounds of warm-up 2 + 4 steps
    python benchmarks/engines_cpu.py --variants ddp peft-ddp --steps 2  # a quick look at two of them

Every variant trains the same randomly initialised ``T5ForConditionalGeneration`` (d_model 512, d_ff
2048, 6 + 6 layers, 8 heads, vocabulary 32128; the model of ``lora_overhead.py``) with LoRA r=8,
alpha=16 on every ``q`` and ``v`` linear layer, AdamW over the trainable parameters only, fp32, on
``--nproc-per-node`` gloo processes (default 2) with ``--per-rank`` sequences each (default 4: a
global batch of 8) of ``--source-len`` input and ``--target-len`` target tokens (default 128 each):

- ``ddp``, ``fsdp`` (FSDP2), ``deepspeed-zero2``, ``deepspeed-zero3``: ``opendelta_dist.LoraModel``
  trained by the engine of that name, driven as the recipe drives it (``micro_step(batch, last=True)``
  then ``optimizer_step()``, which clips the gradient norm to 1.0);
- ``peft-ddp``, the reference: ``peft.get_peft_model`` in a plain ``DistributedDataParallel``, the
  same step written out (forward, backward, clip to 1.0, AdamW step, zero the gradients).

Each measurement is a fresh ``torch.distributed.run`` job that starts this file with ``--worker
VARIANT``; the driver runs them one after another (``--repeats`` rounds, every other one in reverse
order) and reads the result rank 0 writes. In a worker, every rank builds the model, runs
``--warmup`` steps (DeepSpeed compiles its C++ ops before them, in ``deepspeed.initialize``, into
``TORCH_EXTENSIONS_DIR``, default ``~/.cache/opendelta_dist/torch_extensions``: never timed), returns
freed heap to the OS, records its resident set (baseline), runs one more untimed step (which faults
the returned pages in again) and resets the kernel's high-water mark (``/proc/self/clear_refs``).
Then ``--steps`` timed steps, each after a barrier, timed on every rank; the high-water mark after
them is the rank's peak RSS.

Reported per variant: rank 0's median step time (wall clock) and CPU time per step (``process_time``:
what the step costs the process, much less sensitive than wall time to other work on a shared
machine, but blind to time spent waiting), tokens/s (input + target tokens of the global batch per
median step), peak RSS (the largest rank's) and ratios over the ``peft-ddp`` reference, in
``benchmarks/results/engines_cpu.json``, with the machine and the exact configuration.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# run as a script from a checkout: make the package (and the sibling benchmark) importable without installing
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, memory_baseline, peak_rss_kb, reset_peak_rss  # noqa: E402
from benchmarks.lora_overhead import MODEL  # noqa: E402

REFERENCE = "peft-ddp"
# variant -> (engine name, engine options); the reference has no engine
VARIANTS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "ddp": ("ddp", {}),
    "fsdp": ("fsdp", {}),
    "deepspeed-zero2": ("deepspeed", {"stage": 2}),
    "deepspeed-zero3": ("deepspeed", {"stage": 3}),
    REFERENCE: None,
}
# LoRA on every q and v linear layer, self- and cross-attention: PEFT's target_modules=["q", "v"] matches
# module names by their last component, and our addressing does the same, so both modify the same 36 layers
TARGETS = ["q", "v"]
LORA_R, LORA_ALPHA = 8, 16
MAX_GRAD_NORM = 1.0
EXTENSIONS_DIR = Path.home() / ".cache" / "opendelta_dist" / "torch_extensions"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; workers get the same flags plus ``--worker`` and ``--result``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--nproc-per-node", type=int, default=2, help="processes (ranks)")
    parser.add_argument("--per-rank", type=int, default=4, help="sequences per rank and step")
    parser.add_argument("--source-len", type=int, default=128, help="input tokens per sequence")
    parser.add_argument("--target-len", type=int, default=128, help="target tokens per sequence")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per worker")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps before them")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the variants (alternate order)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--timeout", type=float, default=900, help="seconds one worker job may take")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "engines_cpu.json")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------- worker


@dataclass
class Setup:
    """A variant ready to train on this rank.

    Attributes:
        step: one training step (forward, backward, clip, optimizer step, zeroed gradients); returns the loss.
        trainable_params: how many parameters the optimizer trains (counted before any sharding).
        close: what releases the variant's resources at the end.
    """

    step: Callable[[], float]
    trainable_params: int
    close: Callable[[], None]


def _build_model(seed: int) -> Any:
    """The backbone, identical on every rank and in every variant (same seed)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(**MODEL))


def _batch(args: argparse.Namespace, rank: int) -> dict[str, Any]:
    """This rank's sequences (different on every rank, the same in every variant)."""
    import torch

    gen = torch.Generator().manual_seed(args.seed + 1 + rank)
    return {
        "input_ids": torch.randint(2, MODEL["vocab_size"], (args.per_rank, args.source_len), generator=gen),
        "attention_mask": torch.ones(args.per_rank, args.source_len, dtype=torch.long),
        "labels": torch.randint(2, MODEL["vocab_size"], (args.per_rank, args.target_len), generator=gen),
    }


def _engine_setup(args: argparse.Namespace, engine_name: str, options: dict[str, Any]) -> Setup:
    """Our LoRA, trained by the engine ``engine_name`` as the recipe drives it."""
    import torch.distributed as dist

    from opendelta_dist import LoraModel
    from opendelta_dist.train.engines import OptimizerSpec, build_engine
    from opendelta_dist.train.topology import Topology

    topology = Topology.from_environment("cpu")
    topology.init_process_group()
    model = _build_model(args.seed)
    delta = LoraModel(model, lora_r=LORA_R, lora_alpha=LORA_ALPHA, modified_modules=TARGETS)
    delta.freeze_module()
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before sharding hides sizes
    spec = OptimizerSpec(
        lr=args.lr, scheduler="constant", total_steps=args.warmup + args.steps, max_grad_norm=MAX_GRAD_NORM
    )
    engine = build_engine(engine_name, topology, options)
    engine.prepare(model, delta, spec)
    batch = _batch(args, dist.get_rank())

    def step() -> float:
        loss = engine.micro_step(batch, last=True)
        engine.optimizer_step()
        return float(loss)

    return Setup(step, trainable, engine.close)


def _reference_setup(args: argparse.Namespace) -> Setup:
    """PEFT's LoRA in plain PyTorch DDP, the training step written out."""
    import peft
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    config = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    model = peft.get_peft_model(_build_model(args.seed), config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    batch = _batch(args, dist.get_rank())

    def step() -> float:
        loss = ddp(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return Setup(step, sum(p.numel() for p in params), lambda: None)


def run_worker(args: argparse.Namespace) -> None:
    """Measure one variant on this rank; rank 0 writes every rank's measurement to ``args.result``."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    variant = VARIANTS[args.worker]
    setup: Setup | None = None
    try:
        setup = _reference_setup(args) if variant is None else _engine_setup(args, *variant)
        for _ in range(args.warmup):
            setup.step()
        baseline_kb, trimmed = memory_baseline()
        setup.step()  # untimed: the pages the trim gave back are faulted in again here, not in a timed step
        reset_peak_rss()
        times, cpu_times, losses = [], [], []
        for _ in range(args.steps):
            # every rank starts the step together, so rank 0's time is the step's, not a wait for a straggler
            dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            losses.append(setup.step())
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        peak_kb = peak_rss_kb()
        mine = {
            "rank": dist.get_rank(),
            "step_s": times,
            "median_step_s": statistics.median(times),
            "cpu_step_s": cpu_times,
            "median_cpu_step_s": statistics.median(cpu_times),
            "losses": losses,
            "baseline_rss_mb": baseline_kb / 1024,
            "peak_rss_mb": peak_kb / 1024,
            "working_set_mb": (peak_kb - baseline_kb) / 1024,
            "malloc_trim": trimmed,
            "trainable_params": setup.trainable_params,
            "torch_threads": torch.get_num_threads(),
        }
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
        if dist.get_rank() == 0:
            args.result.write_text(json.dumps({"variant": args.worker, "ranks": ranks}))
    finally:
        if setup is not None:
            setup.close()
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- driver


def _worker_flags(args: argparse.Namespace) -> list[str]:
    """The flags every worker gets: the measurement's configuration."""
    return [
        f"--per-rank={args.per_rank}", f"--source-len={args.source_len}", f"--target-len={args.target_len}",
        f"--steps={args.steps}", f"--warmup={args.warmup}", f"--threads={args.threads}", f"--seed={args.seed}",
        f"--lr={args.lr}",
    ]  # fmt: skip


def _spawn(variant: str, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Run one torchrun job for ``variant``; return rank 0's file plus the job's wall time.

    Raises:
        RuntimeError: the job failed or wrote no result (the message holds the end of its output).
    """
    result, log = scratch / f"{variant}.json", scratch / f"{variant}.log"
    result.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc_per_node}",
        str(Path(__file__).resolve()), *_worker_flags(args), f"--worker={variant}", f"--result={result}",
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "DS_ACCELERATOR": "cpu",
        # DeepSpeed's ops compile once per machine into a kept folder (in prepare, before any timed step)
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_DIR)),
    }
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=args.timeout, check=False
        )
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"the {variant} job failed (exit {proc.returncode}):\n{log.read_text()[-6000:]}")
    return {**json.loads(result.read_text()), "job_wall_s": wall}


def _summary(runs: list[dict[str, Any]], global_tokens: int) -> dict[str, Any]:
    """One variant's numbers: rank 0's step times, the largest rank's memory, medians over rounds."""
    median = statistics.median(r["ranks"][0]["median_step_s"] for r in runs)
    return {
        "median_step_s": median,
        # the fastest step is the least disturbed by other work on the machine
        "best_step_s": min(t for r in runs for t in r["ranks"][0]["step_s"]),
        "tokens_per_s": global_tokens / median,
        # CPU time the process spent in a step: what the step costs, little changed by other work on the machine
        "median_cpu_step_s": statistics.median(r["ranks"][0]["median_cpu_step_s"] for r in runs),
        "peak_rss_mb": statistics.median(max(k["peak_rss_mb"] for k in r["ranks"]) for r in runs),
        "peak_rss_mb_per_rank": [
            statistics.median(r["ranks"][i]["peak_rss_mb"] for r in runs) for i in range(len(runs[0]["ranks"]))
        ],
        "working_set_mb": statistics.median(max(k["working_set_mb"] for k in r["ranks"]) for r in runs),
        "trainable_params": runs[0]["ranks"][0]["trainable_params"],
    }


def _ratios(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Every variant over the reference: step time and peak RSS below 1.0, tokens/s above 1.0 mean better."""
    ref = summary[REFERENCE]
    return {
        variant: {
            "step_time": s["median_step_s"] / ref["median_step_s"],
            "best_step_time": s["best_step_s"] / ref["best_step_s"],
            "tokens_per_s": s["tokens_per_s"] / ref["tokens_per_s"],
            "cpu_step_time": s["median_cpu_step_s"] / ref["median_cpu_step_s"],
            "peak_rss": s["peak_rss_mb"] / ref["peak_rss_mb"],
        }
        for variant, s in summary.items()
    }


def _print_table(summary: dict[str, dict[str, Any]], ratios: dict[str, dict[str, float]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = ("variant", "step, median (s)", "step, best (s)", "CPU s/step", "tokens/s", "peak RSS, max rank (MB)")
    for column in (*columns, "step / ref", "CPU / ref", "tokens/s / ref", "peak RSS / ref"):
        table.add_column(column, justify="right")
    for variant, s in summary.items():
        r = ratios.get(variant)
        table.add_row(
            variant,
            f"{s['median_step_s']:.3f}",
            f"{s['best_step_s']:.3f}",
            f"{s['median_cpu_step_s']:.3f}",
            f"{s['tokens_per_s']:.0f}",
            f"{s['peak_rss_mb']:.0f}",
            *(f"{r[k]:.3f}" if r else "" for k in ("step_time", "cpu_step_time", "tokens_per_s", "peak_rss")),
            style="bold" if variant == REFERENCE else None,
        )
    Console(width=max(Console().width, 160)).print(table)


def main(argv: list[str] | None = None) -> None:
    """Run the variants' jobs, then summarise, print and save."""
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        # Leave without the interpreter's shutdown. The gloo process group outlives destroy_process_group
        # here (its threads keep running), and a gloo thread that releases a finished collective while the
        # interpreter shuts down aborts the process ("terminate called without an active exception"): at
        # random, after the measurement, more often on a busy machine.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    import transformers

    load_at_start = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory(prefix="engines_cpu_") as scratch:
        for repeat in range(args.repeats):
            # every other round runs backwards, so slow drift of the machine's load hits every variant alike
            for variant in args.variants if repeat % 2 == 0 else args.variants[::-1]:
                run = _spawn(variant, args, Path(scratch))
                runs[variant].append(run)
                rank0 = run["ranks"][0]
                print(
                    f"round {repeat + 1}/{args.repeats} {variant}: {rank0['median_step_s']:.3f} s/step, peak "
                    f"{max(k['peak_rss_mb'] for k in run['ranks']):.0f} MB, job {run['job_wall_s']:.0f} s, "
                    f"load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
    global_tokens = args.nproc_per_node * args.per_rank * (args.source_len + args.target_len)
    summary = {v: _summary(runs[v], global_tokens) for v in args.variants}
    counts = {v: s["trainable_params"] for v, s in summary.items()}
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"the variants train different parameter counts {counts}: they modify different layers")
    ratios = _ratios(summary) if REFERENCE in summary else {}
    engines = {v: {"engine": e[0], "options": e[1]} for v, e in VARIANTS.items() if e is not None}
    report = {
        "benchmark": "engines_cpu",
        "machine": {
            **machine_info("peft", "deepspeed"),
            "deepspeed": importlib.metadata.version("deepspeed"),
            "load_average_1_5_15m_at_start": load_at_start,
        },
        "config": {
            "model": {
                "class": "T5ForConditionalGeneration",
                "init": "random",
                **MODEL,
                "dropout_rate": transformers.T5Config(**MODEL).dropout_rate,
            },
            "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0, "targets": TARGETS},
            "optimizer": {
                "class": "AdamW",
                "lr": args.lr,
                "params": "trainable only",
                "max_grad_norm": MAX_GRAD_NORM,
                "schedule": "constant",
            },
            "variants": {v: engines.get(v, "peft.get_peft_model + torch DDP") for v in args.variants},
            "reference": REFERENCE,
            "processes": args.nproc_per_node,
            "backend": "gloo",
            "threads_per_process": args.threads,
            "sequences_per_rank": args.per_rank,
            "global_batch": args.nproc_per_node * args.per_rank,
            "source_len": args.source_len,
            "target_len": args.target_len,
            "tokens_per_step": global_tokens,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "seed": args.seed,
            "dtype": "float32",
            "launcher": "python -m torch.distributed.run --standalone --nproc_per_node=N benchmarks/engines_cpu.py "
            "--worker VARIANT, one job per measurement, rounds alternately in forward and reverse order",
            "timing": "rank 0, barrier before each step, median over timed steps (median over rounds); wall clock "
            "(perf_counter) and the process's CPU time (process_time)",
            "memory": "VmHWM after the timed steps, reset by /proc/self/clear_refs after warm-up; max over ranks; "
            "baseline: VmRSS after warm-up and malloc_trim, then one more untimed step before the reset",
        },
        "summary": summary,
        "ratios_over_reference": ratios,
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    title = (
        f"LoRA training step, T5-small-sized, {args.nproc_per_node} CPU processes x {args.per_rank} sequences, "
        f"{args.source_len} -> {args.target_len} tokens"
    )
    _print_table(summary, ratios, title)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
