"""Peak GPU memory, tokens/s and MFU of delta-tuning T5-11B on one GPU capped at 40 GB, beside the memory estimator.

Run from the repository root on a machine with a CUDA GPU of at least 40 GB::

    python benchmarks/t5_11b_gpu.py                                  # every variant, each in a fresh process
    python benchmarks/t5_11b_gpu.py --variants fsdp peft --steps 2   # some of them
    python benchmarks/t5_11b_gpu.py --output /tmp/out.json --time-budget 240   # as scripts/gpu-check.sh runs it

Without CUDA it prints why it skips and exits 0 (importing it never touches a GPU).

The run: T5-11B's real architecture (``configs/model/t5_11b.yaml``, 11,307,321,344 parameters), random bf16
weights built on the GPU (nothing is downloaded), LoRA r=8 (alpha 16) on the self-attention ``q`` and ``v`` of
every block (the common-structure roles ``attn.q`` and ``attn.v``), gradient checkpointing, batches of 8 sequences
of 512 input and 128 target tokens (the first sequence padded to half its length, as training batches are
padded), AdamW over the LoRA parameters, and the process limited to ``--cap-gb`` (default 40) of the GPU with
``torch.cuda.set_per_process_memory_fraction``.

Variants, each with the estimator's configuration for it (``python -m opendelta_dist.estimate
+recipe=lora_t5_11b model.dtype=bf16 world_size=1 micro_batch_size=8 input_tokens=512 target_tokens=128``,
``engine=ENGINE engine.options.precision=bf16`` and the options below):

==================  ===================================================  ===========================
variant             what trains                                          estimator engine
==================  ===================================================  ===========================
``peft``            PEFT's LoRA on the plain transformers model, a       ``single``
                    plain AdamW loop (no engine): the reference
``bmt``             the ``bmt`` engine: its own backbone (ModelCenter's  ``bmt``
                    T5, built on the GPU), bf16 (skipped where it
                    does not exist)
``fsdp``            the ``fsdp`` engine, bf16                            ``fsdp``
``deepspeed-zero2`` the ``deepspeed`` engine, ZeRO-2, bf16               ``deepspeed``, ``stage=2``
``deepspeed-zero3`` the ``deepspeed`` engine, ZeRO-3, bf16               ``deepspeed``, ``stage=3``
==================  ===================================================  ===========================

An engine variant builds the engine first, asks it for the backbone (``engine.build_backbone``; None means the
transformers model of ``build_model``), attaches ``LoraModel(..., common_structure=True,
backend=engine.delta_backend)`` and prepares the engine; its optimizer is torch's AdamW (no DeepSpeed op is
compiled).

Every variant runs in a fresh process (this file started with ``--worker VARIANT``, its output streamed into
this one's, prefixed with the variant): it computes the estimate first (on the meta device: no GPU memory),
builds the model, runs ``--warmup`` steps, resets the peak statistics and runs ``--steps`` steps, each timed
between two ``torch.cuda.synchronize`` calls. Recorded: ``torch.cuda.max_memory_allocated`` (compare with the
estimate's ``allocated_peak_bytes``: both leave out the CUDA context), ``max_memory_reserved``, the device's used
memory at the end (``mem_get_info``: context included; compare with the estimate's ``total_bytes``), the losses,
the step times, an out-of-memory error if one happened, and the estimate's rows; from the median measured step,
tokens/s and MFU (see :func:`model_flops_per_step`, :func:`peak_bf16_flops`). The criteria: every variant fits
the cap, the estimate within 15% of the measured peak (``within_tolerance``), bmt's MFU above PEFT's
(``targets``). The results file (``--output``, default ``benchmarks/results/t5_11b_gpu.json``) is rewritten
after every variant, so a run cut short keeps what it measured; ``finished`` says whether it ran to the end.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# run as a script from a checkout: make the package importable without installing it
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "t5_11b_gpu.json"
TOLERANCE = 0.15
"""The criterion: the estimate within 15% of the measured peak."""
BATCH, INPUT_TOKENS, TARGET_TOKENS = 8, 512, 128
LORA: dict[str, Any] = {"lora_r": 8, "lora_alpha": 16, "modified_modules": ["attn.q", "attn.v"]}
PEFT_TARGETS = r".*SelfAttention\.(q|v)"
"""PEFT's ``target_modules`` for the same layers as the ``attn.q``/``attn.v`` roles on transformers' T5."""
RECIPE = "+recipe=lora_t5_11b"
VARIANTS: dict[str, dict[str, Any]] = {
    "peft": {"engine": None, "estimator_engine": "single", "options": {}},
    "bmt": {"engine": "bmt", "options": {}},
    "fsdp": {"engine": "fsdp", "options": {}},
    "deepspeed-zero2": {"engine": "deepspeed", "options": {"stage": 2}},
    "deepspeed-zero3": {"engine": "deepspeed", "options": {"stage": 3}},
}
PRECISION = {"precision": "bf16"}
"""Every engine computes in bf16 (the recipe's ``engine.options.precision``)."""
PEAK_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    # (pattern on the lower-cased device name, dense bf16 tensor-core peak in TFLOP/s, which part it is);
    # first match wins, so the PCIe/NVL parts come before the SXM part of the same name
    (r"h100.*(pcie)", 756.0, "H100 PCIe"),
    (r"h100.*nvl", 835.0, "H100 NVL"),
    (r"h100", 989.4, "H100 SXM"),
    (r"h200.*nvl", 835.0, "H200 NVL"),
    (r"gh200", 989.4, "GH200"),
    (r"h200", 989.4, "H200 SXM"),
    (r"h800", 989.4, "H800 SXM"),
    (r"b200", 2250.0, "B200"),
    (r"a100", 312.0, "A100"),
    (r"a800", 312.0, "A800"),
    (r"l40s", 362.1, "L40S"),
    (r"\bl4\b", 121.0, "L4"),
)
"""Vendors' datasheet figures without sparsity; a GPU not listed gets no MFU (the record says why)."""


# ----------------------------------------------------------------------------- configuration


def engine_options(variant: str) -> dict[str, Any]:
    """The engine options ``variant`` builds its engine with (none for ``peft``, which uses no engine)."""
    spec = VARIANTS[variant]
    return {} if spec["engine"] is None else {**spec["options"], **PRECISION}


def estimator_overrides(variant: str) -> list[str]:
    """The Hydra overrides the estimator takes for ``variant``: the recipe (bf16 compute on every engine) with
    bf16 weights, the variant's engine (``single`` for ``peft``) and its options."""
    spec = VARIANTS[variant]
    options = {**spec["options"], **PRECISION}
    engine = [f"engine={spec.get('estimator_engine') or spec['engine']}"]
    return [RECIPE, "model.dtype=bf16", *engine, *(f"engine.options.{key}={value}" for key, value in options.items())]


def estimate(variant: str) -> dict[str, Any]:
    """The estimator's report (``format=json``'s content) for ``variant``'s configuration."""
    from opendelta_dist.estimate import compose, estimate_memory

    cfg = compose(estimator_overrides(variant))
    report = estimate_memory(
        cfg, world_size=1, micro_batch_size=BATCH, input_tokens=INPUT_TOKENS, target_tokens=TARGET_TOKENS
    )
    return report.as_dict()


def _model_config(device: str) -> Any:
    """T5-11B's model configuration: its architecture, random bf16 weights built on ``device``."""
    from opendelta_dist.estimate import compose
    from opendelta_dist.train.models import ModelConfig

    options = dict(compose([RECIPE])["model"])
    return ModelConfig(**{**options, "name_or_path": None, "dtype": "bf16", "init_device": device})


# ----------------------------------------------------------------------------- FLOPs and MFU


def flop_parameters(model: Any) -> tuple[int, int]:
    """The parameters each input and each target token passes through, for the model FLOPs of a T5.

    Args:
        model: a transformers T5 (on the meta device is enough).

    Returns:
        ``(encoder, decoder)``: the encoder's parameters without the token embedding (a lookup, no
        multiply-adds); the decoder's without it, plus the LM head's matrix (a product per target token, also
        where it is tied to the embedding).
    """
    embedding = model.get_input_embeddings().weight
    encoder = sum(p.numel() for p in model.get_encoder().parameters() if p is not embedding)
    decoder = sum(p.numel() for p in model.get_decoder().parameters() if p is not embedding)
    return encoder, decoder + model.get_output_embeddings().weight.numel()


def t5_11b_flop_parameters() -> tuple[int, int]:
    """:func:`flop_parameters` of T5-11B, built on the meta device (no memory, no GPU)."""
    from opendelta_dist.train.models import build_model

    return flop_parameters(build_model(_model_config("meta")))


def model_flops_per_step(encoder: int, decoder: int, batch: int, input_tokens: int, target_tokens: int) -> int:
    """Model FLOPs of one training step with frozen weights: ``4 x (encoder x input + decoder x target) x batch``.

    2 FLOPs per parameter and token forward, 2 backward (the gradient of the activations only: frozen weights get
    none); attention's score products and the forward recomputed by gradient checkpointing are not counted.
    """
    return 4 * (encoder * input_tokens + decoder * target_tokens) * batch


def peak_bf16_flops(device_name: str | None) -> tuple[float | None, str]:
    """The dense bf16 peak of the GPU called ``device_name`` (``torch.cuda.get_device_name``).

    Returns:
        ``(FLOP/s, which part it is)``, or ``(None, why not)`` for an unknown device.
    """
    if not device_name:
        return None, "no GPU name was recorded"
    name = device_name.lower()
    for pattern, tflops, part in PEAK_BF16_TFLOPS:
        if re.search(pattern, name):
            return tflops * 1e12, part
    known = ", ".join(part for _, _, part in PEAK_BF16_TFLOPS)
    return None, f"no dense bf16 peak is known for {device_name!r} (known: {known}); add it to PEAK_BF16_TFLOPS"


def throughput(step_seconds: list[float], flops_per_step: int, device_name: str | None) -> dict[str, Any]:
    """Tokens/s and MFU of the median of ``step_seconds`` (an empty list gives nulls)."""
    peak, part = peak_bf16_flops(device_name)
    tokens = BATCH * (INPUT_TOKENS + TARGET_TOKENS)
    result: dict[str, Any] = {"tokens_per_step": tokens, "model_flops_per_step": flops_per_step}
    result |= {"peak_bf16_flops": peak, "peak_source": part if peak else None}
    if not step_seconds:
        return result | {"median_step_seconds": None, "tokens_per_s": None, "mfu": None, "mfu_reason": "no step ran"}
    median = statistics.median(step_seconds)
    result |= {"median_step_seconds": round(median, 4), "tokens_per_s": round(tokens / median, 1)}
    result["achieved_tflops"] = round(flops_per_step / median / 1e12, 1)
    result["mfu"] = round(flops_per_step / median / peak, 4) if peak else None
    if not peak:
        result["mfu_reason"] = part
    return result


# ----------------------------------------------------------------------------- one variant (worker process)


def _batch(vocab: int, device: Any) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(BATCH, INPUT_TOKENS, dtype=torch.long)
    mask[0, INPUT_TOKENS // 2 :] = 0
    batch = {
        "input_ids": torch.randint(2, vocab, (BATCH, INPUT_TOKENS), generator=generator),
        "attention_mask": mask,
        "labels": torch.randint(2, vocab, (BATCH, TARGET_TOKENS), generator=generator),
    }
    return {k: v.to(device) for k, v in batch.items()}


def _engine_step(variant: str, steps: int, phases: dict[str, float]) -> tuple[Any, Any]:
    """Build the variant's engine, its backbone and the delta; return a one-step function and what to close."""
    from dataclasses import replace

    from opendelta_dist import LoraModel
    from opendelta_dist.train.engines import OptimizerSpec, build_engine
    from opendelta_dist.train.models import build_model
    from opendelta_dist.train.topology import Topology

    started = time.perf_counter()
    topology = Topology.from_environment("cuda")
    engine = build_engine(VARIANTS[variant]["engine"], topology, engine_options(variant))
    config = _model_config("cuda")
    # an engine with its own model (bmt) builds it with its own initialisers ("meta": no transformers copy
    # beside it, which would not fit the cap twice)
    model = engine.build_backbone(replace(config, init_device="meta"))
    if model is None:
        model = build_model(config)  # gradient checkpointing and input gradients, as the recipe sets them
    delta = LoraModel(model, **LORA, common_structure=True, backend=engine.delta_backend)
    delta.freeze_module(set_state_dict=False)
    phases["build"] = _lap(started)
    started = time.perf_counter()
    engine.prepare(model, delta, OptimizerSpec(lr=1e-4, total_steps=steps, max_grad_norm=1.0))
    batch = _batch(config.config["vocab_size"], topology.device)
    phases["prepare"] = _lap(started)

    def step() -> float:
        loss = engine.micro_step(batch, last=True)
        engine.optimizer_step()
        return float(loss)

    return step, engine.close


def _peft_step(steps: int, phases: dict[str, float]) -> tuple[Any, Any]:
    """PEFT's LoRA on the plain transformers model and a plain training step: the reference."""
    import torch
    from peft import LoraConfig, get_peft_model

    from opendelta_dist.train.models import build_model

    started = time.perf_counter()
    config = _model_config("cuda")
    model = build_model(config)  # gradient checkpointing and input gradients, as the recipe sets them
    peft_model = get_peft_model(
        model, LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], target_modules=PEFT_TARGETS)
    )
    phases["build"] = _lap(started)
    started = time.perf_counter()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch = _batch(config.config["vocab_size"], next(model.parameters()).device)
    peft_model.train()
    phases["prepare"] = _lap(started)

    def step() -> float:
        loss = peft_model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step, lambda: None


def _lap(started: float) -> float:
    return round(time.perf_counter() - started, 2)


def _steps(step: Any, count: int, label: str, losses: list[float], seconds: list[float]) -> None:
    """Run ``step`` ``count`` times, each between two CUDA synchronisations, appending its loss to ``losses`` and
    its time to ``seconds`` as it goes (what ran is kept if a step runs out of memory)."""
    import torch

    for index in range(count):
        torch.cuda.synchronize()
        started = time.perf_counter()
        losses.append(step())
        torch.cuda.synchronize()
        seconds.append(round(time.perf_counter() - started, 4))
        print(f"{label} {index + 1}: {seconds[-1]:.3f} s, loss {losses[-1]:.4f}", flush=True)


def worker(variant: str, warmup: int, steps: int, cap_gb: float) -> dict[str, Any]:
    """Measure one variant in this process (CUDA required); returns its record."""
    import torch

    device = torch.device("cuda", 0)
    record: dict[str, Any] = {"variant": variant, "gpu": torch.cuda.get_device_name(device)}
    phases: dict[str, float] = {}
    started = time.perf_counter()
    try:
        record["estimate"] = estimate(variant)
    except Exception as exc:  # the measurement is worth having without the estimate
        record["estimate"], record["estimate_error"] = None, f"{type(exc).__name__}: {exc}"
    phases["estimate"] = _lap(started)
    print(f"estimate: {phases['estimate']} s", flush=True)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 1e9 / total), device)
    record |= {"gpu_memory_bytes": total, "cap_bytes": int(min(total, cap_gb * 1e9))}
    losses: list[float] = []
    warmup_seconds: list[float] = []
    step_seconds: list[float] = []
    try:
        if variant == "peft":
            step, close = _peft_step(warmup + steps, phases)
        else:
            step, close = _engine_step(variant, warmup + steps, phases)
        print(f"built in {phases['build']} s, prepared in {phases['prepare']} s", flush=True)
        _steps(step, warmup, "warm-up", losses, warmup_seconds)
        torch.cuda.reset_peak_memory_stats(device)
        _steps(step, steps, "step", losses, step_seconds)
        record["max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
        record["max_memory_reserved"] = torch.cuda.max_memory_reserved(device)
        free, device_total = torch.cuda.mem_get_info(device)
        record["device_used_at_end"] = device_total - free
        close()
    except torch.cuda.OutOfMemoryError as exc:
        record["out_of_memory"] = str(exc).splitlines()[0]
    record |= {"losses": losses, "setup_seconds": phases}
    record |= {"warmup_step_seconds": warmup_seconds, "step_seconds": step_seconds}
    measured = record.get("max_memory_allocated")
    if measured and record["estimate"]:
        ratio = record["estimate"]["allocated_peak_bytes"] / measured
        record["estimate_over_measured"] = round(ratio, 4)
        record["within_tolerance"] = abs(ratio - 1) <= TOLERANCE
    return record


# ----------------------------------------------------------------------------- the driver


def _skip_reason(variant: str) -> str | None:
    """Why ``variant`` cannot run here, or None."""
    import importlib.util

    if variant == "bmt" and not (ROOT / "opendelta_dist" / "train" / "engines" / "bmt.py").is_file():
        return "the bmt engine does not exist yet (opendelta_dist/train/engines/bmt.py)"
    needs = {
        "deepspeed-zero2": ["deepspeed"],
        "deepspeed-zero3": ["deepspeed"],
        "bmt": ["bmtrain", "model_center"],
        "peft": ["peft"],
    }
    missing = [module for module in needs.get(variant, []) if importlib.util.find_spec(module) is None]
    return f"{', '.join(missing)} not installed" if missing else None


def _one_process_environment() -> dict[str, str]:
    """The variables torchrun sets for one process, on a free port: DeepSpeed refuses to start without
    ``LOCAL_RANK``, and BMTrain meets its (one) rank through ``MASTER_ADDR``/``MASTER_PORT``."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    return ranks | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _run_worker(
    variant: str, args: argparse.Namespace, out: Path, timeout: float | None
) -> tuple[int | None, list[str]]:
    """Run ``variant``'s worker, streaming its output prefixed with the variant; returns its exit status
    (None when it was stopped at ``timeout`` seconds) and its last 20 lines."""
    command = [sys.executable, __file__, "--worker", variant, "--out", str(out)]
    command += ["--warmup", str(args.warmup), "--steps", str(args.steps), "--cap-gb", str(args.cap_gb)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **_one_process_environment()}
    tail: collections.deque[str] = collections.deque(maxlen=20)
    with subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                print(f"[{variant}] {line}", end="", flush=True)
                tail.append(line.rstrip())

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code: int | None = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            code = None
        reader.join(timeout=5)
    return code, list(tail)


def summarise(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, bool | None]]:
    """Per-variant figures and the criteria over ``runs`` (a criterion nothing decides yet is None).

    A variant fits the cap when its steps ran; one that ran out of memory does not; one that failed otherwise
    (or was stopped) decides nothing.
    """
    summary: dict[str, Any] = {}
    for run in runs:
        status = "measured" if "max_memory_allocated" in run else "out of memory" if "out_of_memory" in run else None
        status = status or ("skipped" if "skipped" in run else "failed")
        summary[run["variant"]] = {"status": status}
        if status == "measured":
            summary[run["variant"]] |= {
                "peak_allocated_gib": round(run["max_memory_allocated"] / 2**30, 2),
                "estimate_over_measured": run.get("estimate_over_measured"),
                "tokens_per_s": run.get("tokens_per_s"),
                "mfu": run.get("mfu"),
            }
    statuses = [s["status"] for s in summary.values() if s["status"] != "skipped"]
    fits = False if "out of memory" in statuses else True if statuses and "failed" not in statuses else None
    tolerances = [run["within_tolerance"] for run in runs if "within_tolerance" in run]
    mfu = {variant: s.get("mfu") for variant, s in summary.items()}
    targets = {
        "every_variant_fits_cap": fits,
        "estimates_within_tolerance": all(tolerances) if tolerances else None,
        "bmt_mfu_above_peft": mfu["bmt"] > mfu["peft"] if mfu.get("bmt") and mfu.get("peft") else None,
    }
    return summary, targets


def _machine(seen: dict[str, Any] | None) -> dict[str, Any]:
    """:func:`benchmarks.common.machine_info` now, with the GPU a worker saw (this process never initialises
    CUDA: its context would take GPU memory from the workers)."""
    import torch

    gpu = {key: (seen or {}).get(key) for key in ("gpu", "gpu_memory_bytes")}
    return {**machine_info("peft", "deepspeed", "bmtrain", "model-center"), **gpu, "cuda": torch.version.cuda}


def _write(output: Path, result: dict[str, Any]) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(output)  # a reader never sees half a file


def _measure(variant: str, args: argparse.Namespace, timeout: float | None, flops: int) -> dict[str, Any]:
    """One variant's record: skipped, failed/stopped (with the end of its output) or measured."""
    reason = _skip_reason(variant)
    if reason:
        print(f"{variant}: skipped ({reason})", flush=True)
        return {"variant": variant, "skipped": reason}
    print(f"{variant}: started (limit {f'{timeout:.0f} s' if timeout else 'none'})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        code, tail = _run_worker(variant, args, out, timeout)
        if code != 0 or not out.is_file():
            stopped = "stopped after the time limit" if code is None else f"failed (exit {code})"
            print(f"{variant}: {stopped}", flush=True)
            record = {"variant": variant, "failed": tail}
            return record | ({"timeout_seconds": round(timeout or 0)} if code is None else {})
        record = json.loads(out.read_text())
    record |= throughput(record["step_seconds"], flops, record.get("gpu"))
    measured = record.get("max_memory_allocated")
    estimated = (record["estimate"] or {}).get("allocated_peak_bytes")
    shown = f"{measured / 2**30:.2f} GiB" if measured else record.get("out_of_memory", "no measurement")
    shown += f", estimated {estimated / 2**30:.2f} GiB" if estimated else ""
    print(f"{variant}: measured {shown}, {record['tokens_per_s']} tokens/s, MFU {record['mfu']}", flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    """Run every asked variant in a fresh process and write the results file; skip without CUDA."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cap-gb", type=float, default=40.0, help="GPU memory the process may use (GB)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="results file (default: %(default)s)")
    parser.add_argument(
        "--time-budget",
        type=float,
        help="seconds for all variants: each gets what is left over the variants left, and is stopped after it",
    )
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    started = time.monotonic()

    import torch

    if not torch.cuda.is_available():
        print("skipped: benchmarks/t5_11b_gpu.py needs a CUDA GPU (none is visible here)")
        return 0
    if args.worker:
        args.out.write_text(json.dumps(worker(args.worker, args.warmup, args.steps, args.cap_gb), indent=2))
        return 0

    encoder, decoder = t5_11b_flop_parameters()
    flops = model_flops_per_step(encoder, decoder, BATCH, INPUT_TOKENS, TARGET_TOKENS)
    result: dict[str, Any] = {
        "machine": _machine(None),
        "configuration": {
            "model": "T5-11B (configs/model/t5_11b.yaml), random bf16 weights",
            "delta": {**LORA, "common_structure": True},
            "batch": BATCH,
            "input_tokens": INPUT_TOKENS,
            "target_tokens": TARGET_TOKENS,
            "gradient_checkpointing": True,
            "warmup": args.warmup,
            "steps": args.steps,
            "cap_gb": args.cap_gb,
            "tolerance": TOLERANCE,
            "flop_parameters": {"encoder": encoder, "decoder": decoder},
            "model_flops_per_step": flops,
        },
        "runs": [],
        "finished": False,
    }
    for index, variant in enumerate(args.variants):
        timeout = None
        if args.time_budget is not None:
            timeout = max(1.0, (args.time_budget - (time.monotonic() - started)) / (len(args.variants) - index))
        record = _measure(variant, args, timeout, flops)
        result["runs"].append(record)
        result["machine"] = _machine(record if record.get("gpu") else result["machine"])
        result["summary"], result["targets"] = summarise(result["runs"])
        _write(args.output, result)
    result["finished"] = True
    _write(args.output, result)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
