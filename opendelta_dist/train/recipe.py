"""The delta-tuning recipe: one readable class, ``setup / train / evaluate / save_checkpoint / cleanup``.

It turns a run configuration (composed by Hydra from ``configs/`` and ``recipes/``) into calls:
build the backbone, attach the delta, freeze the rest, let the engine wrap/shard it, prove with the
inspector that only the delta trains, then loop with gradient accumulation, clipping, warm-up + decay,
periodic evaluation and atomic checkpoints, and save the final delta as full tensors.

Full fine-tuning is the one run without a delta: ``delta=none`` (``delta_type: none``) attaches nothing
and leaves every parameter trainable. The inspector still proves that the optimizer holds exactly the
trainable parameters (here: all of them); checkpoints and the final save hold the whole model instead of
a delta (``model/`` and ``final_model/``: ``config.json`` + ``model.safetensors``, loadable with
``from_pretrained``). It runs on the engines that keep a whole model on every rank (those whose class
``supports_full_fine_tuning``: ``single``, ``ddp``).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from opendelta_dist.auto_delta import AutoDeltaConfig, AutoDeltaModel, read_config_file
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.config import BaseDeltaConfig
from opendelta_dist.errors import DeltaConfigError, OpenDeltaError
from opendelta_dist.inspect import (
    check_gradients,
    check_optimizer,
    inspect_module_statistics,
    print_module_statistics,
)
from opendelta_dist.saving import save_delta
from opendelta_dist.train import checkpoint as ckpt
from opendelta_dist.train.batching import build_dataloader, check_batch
from opendelta_dist.train.data import DataConfig, TokenizedDataset, build_tokenizer, load_rows
from opendelta_dist.train.engines import (
    OptimizerSpec,
    build_engine,
    engine_class,
    engine_names,
    reads_training_state,
)
from opendelta_dist.train.loggers import CONSOLE_LOG, MetricLogger
from opendelta_dist.train.metrics import METRIC_NAMES, MetricAccumulator, batch_metrics
from opendelta_dist.train.models import ModelConfig, build_model
from opendelta_dist.train.topology import Topology
from opendelta_dist.train.validation import validate_run_config

#: For recovery tests: the rank named by OPENDELTA_DIST_FAIL_RANK exits abruptly when it reaches this
#: step in the first attempt of a torchrun job (TORCHELASTIC_RESTART_COUNT=0).
FAIL_AT_STEP_ENV = "OPENDELTA_DIST_FAIL_AT_STEP"
FAIL_RANK_ENV = "OPENDELTA_DIST_FAIL_RANK"

FULL_FINE_TUNING = "none"
"""The ``delta_type`` of a run without a delta, in which every parameter trains (``configs/delta/none.yaml``)."""
MODEL_WEIGHTS = "model.safetensors"


class TrainingDivergedError(OpenDeltaError, RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python (so dataclasses and JSON take them)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:
        pass
    return value


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def save_full_model(module: torch.nn.Module, path: Path) -> Path:
    """Write a whole model into the directory ``path``, atomically (assembled aside, then renamed).

    ``model.safetensors`` holds every tensor of ``module.state_dict()`` (tensors shared by several names,
    such as tied embeddings, once); ``config.json`` is the transformers config, when the model has one,
    so ``AutoModel...from_pretrained(path)`` loads the result. :func:`load_full_model` reads it back
    exactly.

    Args:
        module: the model (unwrapped, unsharded).
        path: the directory to write; an existing one is replaced.

    Returns:
        ``path``.
    """
    from safetensors.torch import save_model

    staging = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_model(module, str(staging / MODEL_WEIGHTS))
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(staging)
    if path.exists():
        shutil.rmtree(path)
    os.replace(staging, path)
    return path


def load_full_model(module: torch.nn.Module, path: Path) -> None:
    """Copy the weights :func:`save_full_model` wrote into ``module`` (every tensor must fit).

    Raises:
        DeltaConfigError: ``path`` holds no whole model, or its tensors do not fit ``module``.
    """
    from safetensors.torch import load_model

    file = path / MODEL_WEIGHTS
    if not file.is_file():
        raise DeltaConfigError(f"{path} holds no {MODEL_WEIGHTS}: it is not a fully fine-tuned model's checkpoint")
    try:
        load_model(module, str(file), strict=True)
    except RuntimeError as error:
        raise DeltaConfigError(
            f"the weights in {file} do not fit this model ({error}); resume with the model the run started with"
        ) from error


def delta_config(options: dict[str, Any]) -> BaseDeltaConfig | None:
    """The run's delta configuration (the ``delta`` group), or None for full fine-tuning.

    Args:
        options: ``delta_type`` and the method's options; ``delta_type: none`` means no delta.

    Returns:
        The validated config of the delta method, or None when every parameter trains.

    Raises:
        DeltaConfigError: unknown ``delta_type`` or option, or options given with ``delta_type: none``.
    """
    if options.get("delta_type") != FULL_FINE_TUNING:
        return AutoDeltaConfig.from_dict(dict(options))
    extra = sorted(k for k, v in options.items() if k != "delta_type" and v is not None)
    if extra:
        raise DeltaConfigError(
            f"delta_type {FULL_FINE_TUNING!r} (full fine-tuning: no delta, every parameter trains) takes no "
            f"options, but {', '.join(extra)} are set; remove them, or choose a delta (e.g. delta=lora)"
        )
    return None


def _pretrained_state_dict(model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The full state dict of the pretrained backbone ``model_cfg`` names, built on the CPU."""
    return build_model(replace(model_cfg, init_device="cpu")).state_dict()


def _all_reduce(values: list[float], device: torch.device, op: Any = None) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


class _Window:
    """Loss and tokens accumulated since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss, self.tokens, self.steps, self.start = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: float, tokens: int) -> None:
        self.loss += loss
        self.tokens += tokens
        self.steps += 1


def attach_delta(model: torch.nn.Module, options: dict[str, Any], engine: str, backend: str = "hf") -> DeltaBase | None:
    """Attach the configured delta to ``model`` and freeze everything else.

    Args:
        model: the backbone.
        options: the ``delta`` group (``delta_type`` and the method's options).
        engine: the name of the engine the run trains on.
        backend: the backend the engine's backbone takes deltas of (``Engine.delta_backend``).

    Returns:
        The delta; None for full fine-tuning (``delta_type: none``: nothing frozen).

    Raises:
        DeltaConfigError: the delta configuration is invalid (see :func:`delta_config`), or full
            fine-tuning is asked on an engine that shards the model.
    """
    config = delta_config(options)
    if config is not None:
        delta = AutoDeltaModel.from_config(config, model, backend=backend)
        delta.freeze_module(set_state_dict=False)
        return delta
    if not engine_class(engine).supports_full_fine_tuning:
        able = [name for name in engine_names() if engine_class(name).supports_full_fine_tuning]
        raise DeltaConfigError(
            f"full fine-tuning (delta_type {FULL_FINE_TUNING!r}) runs on the engines that keep the whole model "
            f"on every rank ({', '.join(able)}), not on engine={engine}; use engine=ddp, or train a delta with "
            "this engine"
        )
    model.requires_grad_(True)
    return None


def _header(cfg: dict[str, Any], topology: Topology) -> str:
    """One line that says what this run is: model, delta, engine, processes, steps, where it writes."""
    model = cfg["model"].get("name_or_path") or f"a random {cfg['model'].get('config', {}).get('model_type', '')} model"
    train = cfg["train"]
    processes = f"{topology.world_size} process{'es' if topology.world_size > 1 else ''} on {topology.device.type}"
    return (
        f"training {cfg['delta'].get('delta_type')} on {model} with engine {cfg['engine']['name']}, {processes}: "
        f"{train['max_steps']} steps of global batch {train['global_batch_size']}; run_dir {cfg['run_dir']}"
    )


class DeltaTuningRecipe:
    """Delta-tune a backbone on one engine; see the module docstring.

    Args:
        cfg: the composed run configuration (a Hydra ``DictConfig`` or a plain dict).
    """

    def __init__(self, cfg: Any) -> None:
        self.cfg = _plain(cfg)
        self.console = Console(soft_wrap=True)
        self.step = 0
        self._said: list[str] = []  # what rank 0 said before run_dir existed, for its console log

    def say(self, text: str) -> None:
        """Print a line on rank 0's console and keep it in ``run_dir/train.log`` (from the start, once run_dir
        exists). Call on rank 0 only."""
        self.console.print(text, highlight=False)
        log = self.run_dir / CONSOLE_LOG if hasattr(self, "run_dir") else None
        if log is None or not log.parent.is_dir():
            self._said.append(text)
            return
        with log.open("a") as f:
            f.write(text + "\n")

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        """Build everything, prove the optimizer holds exactly the trainable parameters, resume if asked."""
        cfg = self.cfg
        train = cfg["train"]
        # the whole configuration is checked before anything is created: a process group, a model, run_dir
        self.topology = Topology.from_environment(cfg.get("device", "auto"))
        validate_run_config(cfg)
        self.accum = int(train.get("grad_accum", 1))
        self.micro_batch = check_batch(int(train["global_batch_size"]), self.topology.world_size, self.accum)
        self.topology.init_process_group()
        self.main = self.topology.is_main
        if not self.main:  # transformers' load reports and warnings once, from rank 0
            transformers.logging.set_verbosity_error()
        self.run_dir = Path(cfg["run_dir"]).resolve()
        self.ckpt_root = self.run_dir / "checkpoints"
        if self.main:
            self.say(_header(cfg, self.topology))
        torch.manual_seed(int(cfg.get("seed", 0)))

        model_cfg = ModelConfig(**cfg["model"])
        data_cfg = DataConfig(**cfg["data"])
        if data_cfg.task != model_cfg.task:
            raise DeltaConfigError(f"data.task={data_cfg.task!r} but model.task={model_cfg.task!r}; make them equal")
        self.task = data_cfg.task
        self.tokenizer = build_tokenizer(model_cfg.tokenizer or model_cfg.name_or_path)
        train_rows, eval_rows = load_rows(data_cfg, "train"), load_rows(data_cfg, "eval")
        self.train_set = TokenizedDataset(train_rows, self.tokenizer, data_cfg)
        self.eval_set = TokenizedDataset(eval_rows, self.tokenizer, data_cfg)
        self.eval_loader = build_dataloader(
            self.eval_set,
            max(1, int(train.get("eval_batch_size", 32)) // self.topology.world_size),
            self.topology.rank,
            self.topology.world_size,
            seed=0,
            shuffle=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        self.loader = build_dataloader(
            self.train_set,
            self.micro_batch,
            self.topology.rank,
            self.topology.world_size,
            seed=int(cfg.get("seed", 0)),
            shuffle=True,
            pad_token_id=self.tokenizer.pad_token_id,
        )

        engine_cfg = dict(cfg["engine"])
        if engine_class(engine_cfg["name"]).single_process and self.topology.world_size > 1:
            raise DeltaConfigError(
                f"engine={engine_cfg['name']} trains in one process, and this run has {self.topology.world_size} "
                f"(torchrun --nproc_per_node): each would train its own copy. Use engine=ddp (or fsdp, deepspeed) "
                "for several processes, or start one process (python launch/train.py ...)"
            )
        self.engine = build_engine(engine_cfg.pop("name"), self.topology, engine_cfg.get("options") or {})
        # an engine with a model implementation of its own (bmt: ModelCenter) builds the backbone
        own_backbone = self.engine.build_backbone(model_cfg)
        self.model = own_backbone if own_backbone is not None else build_model(model_cfg)
        self.delta = attach_delta(self.model, dict(cfg["delta"]), self.engine.name, self.engine.delta_backend)
        # before any engine shards the weights
        self.checksum = self.engine.backbone_checksum(self.model, self.delta) if self.delta is not None else None
        stats = inspect_module_statistics(self.model, verbose=False)

        resume_from = self._resume_source()
        if resume_from is not None:
            self._check_same_delta(resume_from)
            self._check_resumable(resume_from)

        optim = dict(cfg["optim"])
        spec = OptimizerSpec(
            **{k: v for k, v in optim.items() if k != "betas"},
            betas=tuple(optim.get("betas", (0.9, 0.999))),
            total_steps=int(train["max_steps"]),
            grad_accum=self.accum,
        )
        self.engine.prepare(self.model, self.delta, spec)
        if own_backbone is None and model_cfg.init_device == "meta" and model_cfg.name_or_path:
            # a meta-built backbone has no weights: the engine reads the checkpoint where it needs it
            self.engine.load_pretrained(partial(_pretrained_state_dict, model_cfg))

        # the inspector, enforced: refuse to start unless the optimizer holds exactly the trainable parameters
        held = self.engine.optimized_parameters()
        if self.main:
            print_module_statistics(stats, memory=False)
            if self.delta is None:
                self.say("full fine-tuning (delta_type: none): no delta, every parameter trains")
            self.say(
                f"optimizer ({self.engine.name}): {len(held)} tensors, {self.engine.optimized_numel():,} parameters"
            )
        check_optimizer(held, self.engine.module)

        # written once everything is built, so that a run refused during set-up leaves no run directory
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            with (self.run_dir / CONSOLE_LOG).open("a") as log:
                log.writelines(f"{line}\n" for line in self._said)
            self._said.clear()
        self.logger = MetricLogger(
            list(cfg.get("logger", {}).get("backends", ["console"])),
            self.run_dir,
            enabled=self.main,
            project=cfg.get("logger", {}).get("project", "opendelta-dist"),
            run_name=self.run_dir.name,
            config=cfg,
        )
        if resume_from is not None:
            self._load_checkpoint(resume_from)

    @property
    def _tuned_name(self) -> str:
        """What a checkpoint holds of this run: ``delta``, or ``model`` for full fine-tuning."""
        return "model" if self.delta is None else "delta"

    def _resume_source(self) -> Path | None:
        resume = self.cfg.get("resume")
        if resume in (None, "", "none", False):
            return None
        if resume == "auto":
            return ckpt.latest_checkpoint(self.ckpt_root)
        path = Path(resume)
        ckpt.read_trainer_state(path)  # raises when it is not a finished checkpoint
        return path

    def _check_resumable(self, source: Path) -> None:
        """Refuse, before the engine is prepared, a checkpoint whose optimizer state this engine and topology
        cannot take."""
        state = ckpt.read_trainer_state(source)
        written_by = state.get("engine")
        if written_by is not None and not reads_training_state(self.engine.name, written_by):
            raise DeltaConfigError(
                f"cannot resume from {source}: it was written by engine={written_by}, whose optimizer state "
                f"engine={self.engine.name} cannot read; resume with engine={written_by}, or start a new run "
                f"(another run_dir, or resume=null); its delta is in {source / self._tuned_name}"
            )
        try:
            self.engine.check_resume(state, self.topology)
        except DeltaConfigError as error:
            raise DeltaConfigError(f"cannot resume from {source}: {error}") from error

    def _check_same_delta(self, source: Path) -> None:
        holds = "model" if (source / "model").is_dir() else "delta"
        if holds != self._tuned_name:
            what = {"model": "a fully fine-tuned model (delta_type none)", "delta": "a delta"}
            raise DeltaConfigError(
                f"cannot resume from {source}: it holds {what[holds]} and this run trains {what[self._tuned_name]}. "
                "Resume with the delta configuration it was written with, or start a new run (another run_dir, "
                "or resume=null)."
            )
        if self.delta is None:
            return
        saved = AutoDeltaConfig.from_dict(read_config_file(source / "delta")).to_dict()
        wanted = self.delta.config.to_dict()
        # what the engine saves differently (the bmt engine saves for transformers' T5, backend hf)
        wanted |= {k: v for k, v in self.engine.saved_delta_config().items() if k in wanted}
        differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        if differ:
            details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {wanted.get(k)!r}" for k in differ)
            raise DeltaConfigError(
                f"cannot resume from {source}: its delta configuration differs ({details}). Resume with the "
                "same delta options, or start a new run (another run_dir, or resume=null)."
            )

    def _load_checkpoint(self, source: Path) -> None:
        from safetensors.torch import load_file

        state = ckpt.read_trainer_state(source)
        if self.delta is None:
            load_full_model(self.engine.module, source / "model")
        else:
            self.engine.load_delta(self.delta, load_file(source / "delta" / "delta_model.safetensors"))
        self.engine.load_training_state(source)
        self.loader.batch_sampler.load_state_dict(state["data"])
        ckpt.load_rng(source, self.topology.rank)
        self.step = int(state["step"])
        if self.main:
            self.say(f"resumed from {source} at step {self.step}")

    # ------------------------------------------------------------------ loop

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Training batches of this rank, endlessly, from the sampler's current position."""
        # the sampler advances its epoch when one is exhausted, so this runs for as many epochs as needed
        while True:
            yield from self.loader

    def train_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> tuple[float, int, float | None]:
        """One optimizer step: ``grad_accum`` micro-batches forward and backward, then clip, step, zero.

        Args:
            batches: what :meth:`batches` returns.

        Returns:
            The mean loss of the micro-batches, their token count, and the gradient norm before
            clipping (None when ``optim.max_grad_norm`` is null).

        Raises:
            TrainingDivergedError: the loss is not finite.
        """
        loss, tokens = self._optimizer_step(batches)
        grad_norm = self.engine.optimizer_step()
        self.step += 1
        return loss, tokens, grad_norm

    def _to_device(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.topology.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def train(self) -> dict[str, float]:
        """Run until ``train.max_steps`` optimizer steps; returns the final evaluation metrics."""
        train = self.cfg["train"]
        max_steps = int(train["max_steps"])
        eval_every = int(train.get("eval_every", 0))
        ckpt_every = int(self.cfg.get("checkpoint", {}).get("every", 0))
        log_every = int(train.get("log_every", 10))
        fail_at = int(os.environ.get(FAIL_AT_STEP_ENV, -1))
        fail_here = (
            int(os.environ.get(FAIL_RANK_ENV, -1)) == self.topology.rank
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        )
        batches = self.batches()
        self.engine.model.train()
        window = _Window()
        progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.main,
        )
        with progress:
            bar = progress.add_task("train", total=max_steps, completed=self.step, status="")
            while self.step < max_steps:
                if fail_here and self.step == fail_at:
                    os._exit(17)  # an abrupt death, as a killed rank: no clean-up, no checkpoint
                loss, tokens, grad_norm = self.train_step(batches)
                window.add(loss, tokens)
                if self.step % log_every == 0 or self.step == max_steps:
                    metrics = self._window_metrics(window, grad_norm)
                    self.logger.log(self.step, metrics)
                    progress.update(
                        bar,
                        status=f"loss {metrics['loss']:.4f}  {metrics['tokens_per_s']:.0f} tok/s  "
                        f"{metrics['memory_mb']:.0f} MB",
                    )
                progress.update(bar, completed=self.step)
                if eval_every and self.step % eval_every == 0 and self.step < max_steps:
                    self.logger.log(self.step, self.evaluate(), prefix="eval")
                if ckpt_every and self.step % ckpt_every == 0:
                    self.save_checkpoint()
        final = self.evaluate()
        self.logger.log(self.step, final, prefix="eval")
        self.save_final()
        return final

    def _optimizer_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> tuple[float, int]:
        """Forward and backward of ``grad_accum`` micro-batches; returns their mean loss and token count.

        Raises:
            TrainingDivergedError: the loss is not finite on some rank (every rank stops together).
        """
        losses, tokens = [], 0
        for i in range(self.accum):
            batch = self._to_device(next(batches))
            losses.append(self.engine.micro_step(batch, last=i == self.accum - 1))
            tokens += int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
            if self.step == 0 and i == 0:
                check_gradients(self.engine.module)  # after the first backward: only trainable tensors have grads
        loss = torch.stack(losses).float().mean()
        finite = _all_reduce([float(torch.isfinite(loss))], self.topology.device, dist.ReduceOp.MIN)[0]
        if not finite:
            last = ckpt.latest_checkpoint(self.ckpt_root)
            fix = "lower optim.lr, set optim.max_grad_norm, or use bf16 instead of fp16"
            then = (
                f"The last good checkpoint is {last}: {fix}, then resume=auto."
                if last
                else f"No checkpoint was written yet: {fix}, and start again."
            )
            raise TrainingDivergedError(f"the loss is {loss.item()} at step {self.step + 1}; training stopped. {then}")
        return loss.item(), tokens

    def _window_metrics(self, window: _Window, grad_norm: float | None) -> dict[str, float]:
        """Loss averaged over ranks and steps since the last log, throughput of all ranks, memory."""
        loss_sum, tokens = _all_reduce([window.loss, float(window.tokens)], self.topology.device)
        metrics = {
            "loss": loss_sum / (window.steps * self.topology.world_size),
            "lr": self.engine.lr(),
            "tokens_per_s": tokens / max(time.perf_counter() - window.start, 1e-9),
            "memory_mb": _memory_mb(self.topology.device),
        }
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        window.reset()
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and task metric (accuracy or exact match) on the evaluation set, over all ranks.

        The evaluation loader gives every rank the same number of batches and every example once,
        so sharded engines run matching forwards and the metric does not depend on the world size.
        """
        metric = METRIC_NAMES[self.task]
        sums = MetricAccumulator(metric)
        model = self.engine.model
        model.eval()
        for raw in self.eval_loader:
            batch = self._to_device(raw)
            sums.update(*batch_metrics(self.task, self.engine.eval_forward(batch).logits.float(), batch["labels"]))
        model.train()
        return sums.compute(self.topology.device)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Write a training checkpoint atomically; see :mod:`opendelta_dist.train.checkpoint`."""
        final, staging = ckpt.step_dir(self.ckpt_root, self.step), ckpt.staging_dir(self.ckpt_root, self.step)
        if self.main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.topology.barrier()
        self._save_tuned(staging / self._tuned_name)
        self.engine.save_training_state(staging)
        ckpt.save_rng(staging, self.topology.rank)
        self.topology.barrier()
        if self.main:
            state = {
                "step": self.step,
                "data": self.loader.batch_sampler.state_dict(),
                "world_size": self.topology.world_size,
                "engine": self.engine.name,
            }
            ckpt.write_trainer_state(staging, state)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            ckpt.prune(self.ckpt_root, int(self.cfg.get("checkpoint", {}).get("keep_last", 2)))
        self.topology.barrier()
        return final

    def _save_tuned(self, path: Path) -> None:
        """Write what this run trains into ``path``; collective, rank 0 writes.

        A delta: its full tensors in the ``save_finetuned`` format. Full fine-tuning: the whole model
        (:func:`save_full_model`; the engines it runs on hold it unsharded on every rank).
        """
        if self.delta is None:
            if self.main:
                save_full_model(self.engine.module, path)
            return
        tensors = self.engine.gather_delta(self.delta)
        if self.main:
            save_delta(
                self.delta,
                path,
                state_dict=tensors,
                checksum=self.checksum,
                config_updates=self.engine.saved_delta_config(),
            )

    def save_final(self) -> Path:
        """Save the final delta (full tensors, ``save_finetuned`` format) to ``<run_dir>/final_delta``, or
        the whole model after full fine-tuning to ``<run_dir>/final_model`` (:func:`save_full_model`)."""
        path = self.run_dir / f"final_{self._tuned_name}"
        self._save_tuned(path)
        if self.main:
            self.say(f"saved the final {self._tuned_name} to {path}")
            self.say(f"use it: python launch/predict.py run_dir={self.run_dir}")
        self.topology.barrier()
        return path

    def cleanup(self) -> None:
        """Close loggers and the engine and leave the process group; always runs."""
        logger = getattr(self, "logger", None)
        if logger is not None:
            logger.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
        topology = getattr(self, "topology", None)
        if topology is not None:
            topology.destroy_process_group()


def run(cfg: Any) -> dict[str, float]:
    """Set up, train and clean up (even on failure); returns the final evaluation metrics."""
    recipe = DeltaTuningRecipe(cfg)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()
