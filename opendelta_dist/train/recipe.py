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
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import transformers
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from opendelta_dist.errors import DeltaCheckpointError, DeltaConfigError, OpenDeltaError
from opendelta_dist.inspect import (
    check_gradients,
    check_optimizer,
    inspect_module_statistics,
    print_module_statistics,
)
from opendelta_dist.saving import save_delta
from opendelta_dist.train import checkpoint as ckpt
from opendelta_dist.train import rundir
from opendelta_dist.train.batching import build_dataloader, check_batch
from opendelta_dist.train.data import DataConfig, load_rows
from opendelta_dist.train.engines import (
    OptimizerSpec,
    build_engine,
    engine_class,
)
from opendelta_dist.train.loggers import CONSOLE_LOG, MetricLogger
from opendelta_dist.train.metrics import MetricAccumulator
from opendelta_dist.train.models import ModelConfig, build_model, model_architecture
from opendelta_dist.train.progress import LogWindow, all_reduce_floats, memory_mb, run_header
from opendelta_dist.train.resume import check_resumable, check_same_delta, resume_source
from opendelta_dist.train.stopping import RunStopped, Stopper, drill, parse_margin, parse_signal
from opendelta_dist.train.tasks import build_task
from opendelta_dist.train.topology import Topology
from opendelta_dist.train.tuning import attach_delta, load_full_model, save_full_model
from opendelta_dist.train.validation import validate_run_config

#: For recovery tests: the rank named by OPENDELTA_DIST_FAIL_RANK exits abruptly when it reaches this
#: step in the first attempt of a torchrun job (TORCHELASTIC_RESTART_COUNT=0).
FAIL_AT_STEP_ENV = "OPENDELTA_DIST_FAIL_AT_STEP"
FAIL_RANK_ENV = "OPENDELTA_DIST_FAIL_RANK"


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


def _pretrained_state_dict(model_cfg: ModelConfig, head: str) -> dict[str, torch.Tensor]:
    """The full state dict of the pretrained backbone ``model_cfg`` names, built on the CPU."""
    return build_model(replace(model_cfg, init_device="cpu"), head=head).state_dict()


def _model_type(model_cfg: ModelConfig) -> str | None:
    """The backbone's transformers ``model_type`` (from ``model.config``, else its checkpoint's config)."""
    return model_architecture(model_cfg).model_type


class DeltaTuningRecipe:
    """Delta-tune a backbone on one engine; see the module docstring.

    Args:
        cfg: the composed run configuration (a Hydra ``DictConfig`` or a plain dict).
    """

    def __init__(self, cfg: Any) -> None:
        self.cfg = _plain(cfg)
        self.console = Console(soft_wrap=True)
        self.step = 0
        self._said: list[str] = []  # what rank 0 said before run_dir was opened, for its console log
        self._log_open = False

    def say(self, text: str) -> None:
        """Print a line on rank 0's console and keep it in ``run_dir/train.log`` (from the start, once run_dir
        exists). Call on rank 0 only."""
        self.console.print(text, highlight=False)
        if not self._log_open:  # a run refused during set-up leaves its run directory as it was
            self._said.append(text)
            return
        with (self.run_dir / CONSOLE_LOG).open("a") as f:
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
        self.run_dir = Path(cfg["run_dir"]).resolve()
        self.ckpt_root = self.run_dir / "checkpoints"
        # one run per run directory; checked by every rank before the process group, so before rank 0 writes
        self.resume = rundir.resume_setting(cfg, self.run_dir)
        rundir.check_run_dir_free(self.run_dir, self.resume, bool(cfg.get("overwrite_run_dir")))
        checkpoint_cfg = cfg.get("checkpoint", {})
        self.stopper = Stopper(
            self.topology.rank,
            self.topology.device,
            parse_signal(checkpoint_cfg.get("signal", "USR1")),
            parse_margin(checkpoint_cfg.get("time_limit_margin", "auto")),
            int(checkpoint_cfg.get("max_requeues", 20)),
        )
        self.stopper.install()  # from here a signal is noted, and the run stops at its first agreed point
        self.topology.init_process_group()
        self.main = self.topology.is_main
        if not self.main:  # transformers' load reports and warnings once, from rank 0
            transformers.logging.set_verbosity_error()
        self._lock = None
        if self.run_dir.is_dir():
            self._lock = rundir.claim_on_rank0(self.run_dir, self.main)  # no second live run in it
        self.finished = self._finished_result()
        if self.finished is not None:
            return
        if self.main:
            self.say(run_header(cfg, self.topology))
        resume_from = self._resume_source()
        torch.manual_seed(int(cfg.get("seed", 0)))

        model_cfg = ModelConfig(**cfg["model"])
        data_cfg = DataConfig(**cfg["data"])
        self.task = build_task(cfg)
        self.tokenizer = self.task.build_tokenizer()
        train_rows = load_rows(data_cfg, "train", self.task.targets)
        eval_rows = load_rows(data_cfg, "eval", self.task.targets)

        drill(self.topology.rank, 0, "setup")
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
        head = self.task.model_head(_model_type(model_cfg))
        backbone = own_backbone if own_backbone is not None else build_model(model_cfg, head=head)
        self.model = self.task.wrap_model(backbone, self.tokenizer)
        self._build_loaders(train_rows, eval_rows)  # after the model: a prompt task's template wraps the rows
        delta_options = self.task.delta_options(dict(cfg["delta"]), self.model)
        self.delta = attach_delta(
            self.model, delta_options, self.engine.name, self.engine.delta_backend, int(cfg.get("seed", 0))
        )
        self.dropper = self.delta.robust_drop if self.delta is not None else None  # robust AdapterDrop
        # before any engine shards the weights
        self.checksum = self.engine.backbone_checksum(self.model, self.delta) if self.delta is not None else None
        stats = inspect_module_statistics(self.model, verbose=False)

        if resume_from is not None:
            check_same_delta(resume_from, self.delta, self.engine, self._tuned_name)
            check_resumable(resume_from, self.engine, self.topology, self._tuned_name)

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
            self.engine.load_pretrained(partial(_pretrained_state_dict, model_cfg, head))

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

        # written once everything is built, so that a run refused during set-up leaves its run directory as it was
        resume_step = int(ckpt.read_trainer_state(resume_from)["step"]) if resume_from is not None else None
        if self.main:
            self._open_run_dir(resume_step)
        self.logger = MetricLogger(
            list(cfg.get("logger", {}).get("backends", ["console"])),
            self.run_dir,
            enabled=self.main,
            project=cfg.get("logger", {}).get("project", "opendelta-dist"),
            run_name=self.run_dir.name,
            config=cfg,
            resume_step=resume_step,
        )
        self.pending_eval = False
        if resume_from is not None:
            self._load_checkpoint(resume_from)

    def _build_loaders(self, train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]) -> None:
        """The task's data sets and this rank's training and evaluation loaders."""
        top, collate_fn = self.topology, partial(self.task.collate, tokenizer=self.tokenizer)
        self.train_set = self.task.dataset(train_rows, self.tokenizer)
        self.eval_set = self.task.dataset(eval_rows, self.tokenizer)
        pad, eval_batch = self.tokenizer.pad_token_id, int(self.cfg["train"].get("eval_batch_size", 32))
        self.eval_loader = build_dataloader(
            self.eval_set, max(1, eval_batch // top.world_size), top.rank, top.world_size, 0, False, pad,
            collate_fn=collate_fn,
        )  # fmt: skip
        self.loader = build_dataloader(
            self.train_set, self.micro_batch, top.rank, top.world_size, int(self.cfg.get("seed", 0)), True, pad,
            collate_fn=collate_fn,
        )  # fmt: skip

    def _finished_result(self) -> dict[str, Any] | None:
        """``result.json`` of the run this one continues, when that run has done every step asked."""
        result = rundir.read_result(self.run_dir) if self.resume == "auto" else None
        if result is None or int(result.get("step", 0)) < int(self.cfg["train"]["max_steps"]):
            return None
        if self.main:
            self.say(
                f"{self.run_dir} holds a run that finished at step {result['step']} (train.max_steps="
                f"{self.cfg['train']['max_steps']}); its {result.get('final', 'final_delta')} is there: nothing to do. "
                "To train more steps, raise train.max_steps; to train again, overwrite_run_dir=true or another run_dir"
            )
        return result

    def _open_run_dir(self, resume_step: int | None) -> None:
        """Rank 0: create (or continue, or replace) the run directory and write the run's configuration."""
        cfg = self.cfg
        if cfg.get("overwrite_run_dir") and rundir.run_files(self.run_dir):
            present = ", ".join(rundir.run_files(self.run_dir))
            self.say(f"overwrite_run_dir=true: deleting the run in {self.run_dir} ({present})")
            rundir.clear_run(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self._lock is None:
            self._lock = rundir.claim(self.run_dir)
        with (self.run_dir / CONSOLE_LOG).open("a") as log:
            log.writelines(f"{line}\n" for line in self._said)
        self._said.clear()
        self._log_open = True
        config_file = self.run_dir / rundir.CONFIG
        if self.resume is not None and config_file.is_file():
            changed = rundir.changed_settings(json.loads(config_file.read_text()), cfg, ignore=("resume",))
            if changed:
                self.say(f"resuming with changed settings: {'; '.join(changed)}")
        if self.resume is not None:  # resume=auto without a checkpoint starts again from step 0
            step, max_steps = resume_step or 0, int(cfg["train"]["max_steps"])
            rundir.truncate_metrics(self.run_dir, step, final_eval_due=step >= max_steps)
        (self.run_dir / rundir.RESULT).unlink(missing_ok=True)  # a finished run given more steps is running again
        config_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    @property
    def _tuned_name(self) -> str:
        """What a checkpoint holds of this run: ``delta``, or ``model`` for full fine-tuning."""
        return "model" if self.delta is None else "delta"

    def _resume_source(self) -> Path | None:
        say = self.say if self.main else None
        return resume_source(self.resume, self.ckpt_root, int(self.cfg["train"]["max_steps"]), say)

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
        self.pending_eval = bool(state.get("pending_eval", False))
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
        """Run until ``train.max_steps`` optimizer steps; returns the final evaluation metrics.

        Raises:
            RunStopped: a signal or the time limit stopped the run early, at a step every rank agreed on, where
                it wrote a checkpoint (:mod:`opendelta_dist.train.stopping`).
        """
        if self.finished is not None:
            return dict(self.finished.get("eval", {}))
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
        window = LogWindow()
        progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.main,
        )
        if self.pending_eval and self.step < max_steps:  # the evaluation a stop interrupted
            self._log_eval(self.evaluate())
        if self.stopper.poll():  # a signal during set-up
            self._stop(pending_eval=self.pending_eval)
        with progress:
            bar = progress.add_task("train", total=max_steps, completed=self.step, status="")
            while self.step < max_steps:
                if fail_here and self.step == fail_at:
                    os._exit(17)  # an abrupt death, as a killed rank: no clean-up, no checkpoint
                started = time.perf_counter()
                loss, tokens, grad_norm = self.train_step(batches)
                self.stopper.record_step(time.perf_counter() - started)
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
                    self._log_eval(self.evaluate())
                if ckpt_every and self.step % ckpt_every == 0:
                    self.save_checkpoint()
                if self.stopper.poll():
                    self._stop()
        final = self._log_eval(self.evaluate())
        path = self.save_final()
        if self.main:
            rundir.write_result(self.run_dir, self.step, final, path)
        return final

    def _log_eval(self, metrics: dict[str, float] | None) -> dict[str, float]:
        """Log an evaluation's metrics; an evaluation a stop interrupted (None) stops the run here."""
        if metrics is None:
            self._stop(pending_eval=True)
        self.logger.log(self.step, metrics, prefix="eval")
        return metrics

    def _stop(self, pending_eval: bool = False) -> NoReturn:
        """Stop where the ranks agreed (:meth:`Stopper.poll`): one checkpoint at this step (unless there is
        one), a requeue of the Slurm job when the stop asks for one, one line; collective.

        Raises:
            RunStopped: always, with the exit status of the stop.
        """
        reason = self.stopper.reason
        assert reason is not None
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        if self.step > 0 and (latest is None or latest != ckpt.step_dir(self.ckpt_root, self.step) or pending_eval):
            latest = self.save_checkpoint(pending_eval=pending_eval)
        requeued = self.stopper.requeue() if self.main and self.stopper.wants_requeue() else None
        self.topology.barrier()  # no rank exits (and makes its launcher stop the others) before the requeue
        if latest is None:
            message = f"stopped on {reason} before the first step: nothing to save"
        else:
            message = f"stopped at step {self.step} on {reason}: checkpoint {latest}"
        message += f"; {requeued}" if requeued else "; the same command with resume=auto continues from it"
        if self.main:
            self.say(message)
        raise RunStopped(message, reason.exit_status)

    def _optimizer_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> tuple[float, int]:
        """Forward and backward of ``grad_accum`` micro-batches; returns their mean loss and token count.

        Raises:
            TrainingDivergedError: the loss is not finite on some rank (every rank stops together).
        """
        losses, tokens = [], 0
        if self.dropper is not None:
            self.dropper.before_step(self.step)  # the same layers dropped on every rank, and after a resume
        for i in range(self.accum):
            batch = self._to_device(next(batches))
            losses.append(self.engine.micro_step(batch, last=i == self.accum - 1))
            tokens += self.task.tokens(batch)
            if i == 0:
                if self.step == 0:
                    check_gradients(self.engine.module)  # after the first backward: only trainable tensors have grads
                drill(self.topology.rank, self.step + 1, "step")
        loss = torch.stack(losses).float().mean()
        finite = all_reduce_floats([float(torch.isfinite(loss))], self.topology.device, dist.ReduceOp.MIN)[0]
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

    def _window_metrics(self, window: LogWindow, grad_norm: float | None) -> dict[str, float]:
        """Loss averaged over ranks and steps since the last log, throughput of all ranks, memory."""
        loss_sum, tokens = all_reduce_floats([window.loss, float(window.tokens)], self.topology.device)
        metrics = {
            "loss": loss_sum / (window.steps * self.topology.world_size),
            "lr": self.engine.lr(),
            "tokens_per_s": tokens / max(time.perf_counter() - window.start, 1e-9),
            "memory_mb": memory_mb(self.topology.device),
        }
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if self.dropper is not None:  # robust AdapterDrop: lowest layers dropped, per step since the last log
            metrics["dropped_layers"] = self.dropper.mean_dropped(range(self.step - window.steps, self.step))
        window.reset()
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Loss and task metric (accuracy or exact match) on the evaluation set, over all ranks.

        The evaluation loader gives every rank the same number of batches and every example once,
        so sharded engines run matching forwards and the metric does not depend on the world size.
        Before each batch the ranks agree whether to stop (:meth:`Stopper.poll`); a stop returns None.
        """
        sums = MetricAccumulator(self.task.metric)
        if self.dropper is not None:
            self.dropper.for_eval()
        model = self.engine.model
        model.eval()
        for raw in self.eval_loader:
            if self.stopper.poll():
                model.train()
                return None
            batch = self._to_device(raw)
            sums.update(*self.task.eval_sums(self.engine.eval_forward(batch), batch))
            drill(self.topology.rank, self.step, "eval")
        model.train()
        return sums.compute(self.topology.device)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, pending_eval: bool = False) -> Path:
        """Write a training checkpoint atomically; see :mod:`opendelta_dist.train.checkpoint`. Collective.

        It is assembled in a hidden directory and renamed into place once every rank has written its part.
        Each phase ends with the ranks agreeing that it succeeded, so an error on one rank (a full disk)
        stops every rank with it, the staging directory is removed and the previous checkpoints stay.

        Args:
            pending_eval: the evaluation of this step was interrupted; a resumed run runs it first.

        Raises:
            CheckpointSpaceError: the filesystem has too little space (checked first against the size of
                the last checkpoint, and when a write fails for want of space).
        """
        started = time.perf_counter()
        final, staging = ckpt.step_dir(self.ckpt_root, self.step), ckpt.staging_dir(self.ckpt_root, self.step)
        previous = ckpt.latest_checkpoint(self.ckpt_root)
        needed = ckpt.checkpoint_size(previous) if previous is not None else None

        def prepare() -> None:
            if needed is not None:
                ckpt.check_free_space(self.ckpt_root, needed)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)

        def finish() -> None:
            state = {
                "step": self.step,
                "data": self.loader.batch_sampler.state_dict(),
                "world_size": self.topology.world_size,
                "engine": self.engine.name,
                "pending_eval": pending_eval,
            }
            ckpt.write_trainer_state(staging, state)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)

        def parts() -> None:
            self.engine.save_training_state(staging)
            ckpt.save_rng(staging, self.topology.rank)

        self._checkpoint_phase(prepare if self.main else None, staging, needed)
        self._checkpoint_phase(partial(self._save_tuned, staging / self._tuned_name), staging, needed)
        drill(self.topology.rank, self.step, "checkpoint")
        self._checkpoint_phase(parts, staging, needed)
        self._checkpoint_phase(finish if self.main else None, staging, needed)
        if self.main:
            ckpt.prune(self.ckpt_root, int(self.cfg.get("checkpoint", {}).get("keep_last", 2)))
        self.topology.barrier()
        self.stopper.record_checkpoint(time.perf_counter() - started)
        return final

    def _checkpoint_phase(self, write: Any, staging: Path, needed: int | None) -> None:
        """Run one phase of a checkpoint write on this rank (``write`` None: nothing to do here), then agree
        with every rank that it succeeded; on a failure anywhere, every rank raises and rank 0 removes the
        staging directory."""
        error: BaseException | None = None
        if write is not None:
            try:
                with ckpt.writing(staging, needed):
                    write()
            except Exception as exc:
                error = ckpt.space_error(staging, needed, exc) or exc
        failed = all_reduce_floats([float(error is not None)], self.topology.device, dist.ReduceOp.MAX)[0]
        if not failed:
            return
        if self.main:
            shutil.rmtree(staging, ignore_errors=True)
        if error is not None:
            raise error
        raise DeltaCheckpointError(
            f"the checkpoint at step {self.step} failed on another rank (its error is in its output); "
            f"the previous checkpoints in {self.ckpt_root} are intact"
        )

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
            self.task.save(self.engine.module, path)

    def save_final(self) -> Path:
        """Save the final delta (full tensors, ``save_finetuned`` format) to ``<run_dir>/final_delta``, or
        the whole model after full fine-tuning to ``<run_dir>/final_model`` (:func:`save_full_model`)."""
        path = self.run_dir / f"final_{self._tuned_name}"
        self._checkpoint_phase(partial(self._save_tuned, path), path.with_name(f".{path.name}.tmp"), None)
        if self.main:
            self.say(f"saved the final {self._tuned_name} to {path}")
            self.say(f"use it: python launch/predict.py run_dir={self.run_dir}")
        self.topology.barrier()
        return path

    def cleanup(self) -> None:
        """Close loggers and the engine and leave the process group; always runs."""
        # in this order: loggers, engine, process group, signal handlers, run directory lock; each if it was made
        for part, close in (
            ("logger", "close"),
            ("engine", "close"),
            ("topology", "destroy_process_group"),
            ("stopper", "uninstall"),
            ("_lock", "close"),
        ):
            made = getattr(self, part, None)
            if made is not None:
                getattr(made, close)()

    def interrupted(self) -> RunStopped:
        """What Ctrl-C (SIGINT) ends the run with: one line saying where it stopped and how to go on."""
        latest = ckpt.latest_checkpoint(self.ckpt_root) if hasattr(self, "ckpt_root") else None
        where = f"at step {self.step}" if self.step else "before the first step"
        how = (
            f"the last checkpoint is {latest}: the same command with resume=auto continues from it"
            if latest is not None
            else "no checkpoint was written: the same command with resume=auto starts again"
        )
        return RunStopped(f"interrupted (Ctrl-C) {where}; {how}", 130)


def run(cfg: Any) -> dict[str, float]:
    """Set up, train and clean up (even on failure); returns the final evaluation metrics.

    Raises:
        RunStopped: a signal, the time limit or Ctrl-C stopped the run before its last step.
    """
    recipe = DeltaTuningRecipe(cfg)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        recipe.setup()
        return recipe.train()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # torchrun passes the terminal's Ctrl-C on: a second one
        stop = recipe.interrupted()
        if getattr(recipe, "main", int(os.environ.get("RANK", "0")) == 0):
            recipe.say(str(stop))
        raise stop from None
    finally:
        recipe.cleanup()
        signal.signal(signal.SIGINT, sigint)
