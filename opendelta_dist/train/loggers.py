"""Metric loggers: console, TensorBoard, Weights & Biases. Only rank 0 logs."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console

from opendelta_dist.errors import DeltaConfigError

#: rank 0's console lines, kept in the run directory
CONSOLE_LOG = "train.log"
#: every logged metric, one JSON object per line
METRICS_FILE = "metrics.jsonl"
#: the W&B run id of a run directory, so that a resumed run continues the same W&B run
WANDB_ID = "wandb-run-id"


def _number(value: Any) -> str:
    """A metric as people read it: whole numbers for large values (tokens/s 14583, not 1.458e+04), else 4
    significant digits."""
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class MetricLogger:
    """Sends ``{name: value}`` at a step to every configured backend, and to ``<run_dir>/metrics.jsonl``.

    Args:
        backends: any of ``"console"``, ``"tensorboard"``, ``"wandb"``.
        run_dir: the run's directory (TensorBoard and offline W&B files go under it).
        enabled: False on every rank but 0.
        project: W&B project name.
        run_name: W&B run name.
        config: the resolved run configuration, recorded by W&B.
        resume_step: the step a resumed run continues from: TensorBoard drops its events after it, and W&B
            continues the run directory's W&B run.
    """

    def __init__(
        self,
        backends: list[str],
        run_dir: Path,
        enabled: bool,
        project: str = "opendelta-dist",
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
        resume_step: int | None = None,
    ) -> None:
        unknown = set(backends) - {"console", "tensorboard", "wandb"}
        if unknown:
            raise DeltaConfigError(f"unknown logger(s) {sorted(unknown)}; choose from console, tensorboard, wandb")
        self.enabled = enabled
        self.console = Console(soft_wrap=True)
        self.backends = list(backends)
        self._tb: Any = None
        self._wandb: Any = None
        self._jsonl = run_dir / METRICS_FILE
        self._write_failed = False
        self._console_log = run_dir / CONSOLE_LOG
        if not enabled:
            return
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)
        if "wandb" in backends:
            import wandb

            # without credentials, log offline into the run directory (sync later with `wandb sync`)
            offline = not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") != "online"
            for var, sub in (
                ("WANDB_DIR", ""),
                ("WANDB_CACHE_DIR", "wandb-cache"),
                ("WANDB_CONFIG_DIR", "wandb-config"),
            ):
                os.environ.setdefault(var, str(run_dir / sub) if sub else str(run_dir))
            id_file = run_dir / WANDB_ID
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id + "\n")
            self._wandb = wandb.init(
                project=project,
                name=run_name,
                config=config,
                mode="offline" if offline else None,
                dir=str(run_dir),
                id=run_id,
                resume="allow",
            )

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        """Record ``metrics`` at ``step`` under ``prefix/``."""
        if not self.enabled:
            return
        self._append(self._jsonl, json.dumps({"split": prefix, "step": step, **metrics}) + "\n")
        if "console" in self.backends:
            shown = "  ".join(f"{k} {_number(v)}" for k, v in metrics.items())
            self.console.print(f"[bold]{prefix}[/] step {step}: {shown}", highlight=False, soft_wrap=True)
            self._append(self._console_log, f"{prefix} step {step}: {shown}\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{prefix}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

    def _append(self, path: Path, text: str) -> None:
        """Append to a log file; a full disk costs the file's lines (said once), not the run: the
        checkpoint, which needs the space, is where the run stops with the reason."""
        try:
            with path.open("a") as f:
                f.write(text)
        except OSError as error:
            if not self._write_failed:
                self._write_failed = True
                self.console.print(f"warning: cannot write {path} ({error.strerror}); metrics go to the console only")

    def close(self) -> None:
        """Flush and close the backends."""
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
