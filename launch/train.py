"""Train a delta with one command, on one process or many.

    torchrun --standalone --nproc_per_node=2 launch/train.py +recipe=lora_t5_tiny
    torchrun --nproc_per_node=8 launch/train.py +recipe=lora_t5_11b engine=fsdp
    python launch/train.py +recipe=lora_t5_tiny engine=single train.max_steps=20
    python launch/train.py -m hydra/launcher=slurm +recipe=lora_t5_base optim.lr=1e-4,3e-4   # a Slurm sweep

The configuration is composed by Hydra from configs/ (defaults) and recipes/ (what a recipe changes);
any key can be overridden on the command line. Every rank composes the same configuration and
writes under the same run_dir (no timestamp in it: the same command resumes with resume=auto);
only rank 0 writes files and logs. With ``-m hydra/launcher=slurm`` every point of a sweep is a Slurm
job that runs torchrun on its nodes (launch/hydra_plugins/, configs/hydra/launcher/slurm.yaml).
"""

from __future__ import annotations

import json
import os
import sys
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

from opendelta_dist.errors import DeltaConfigError, OpenDeltaError
from opendelta_dist.train.data import DataError
from opendelta_dist.train.recipe import run
from opendelta_dist.train.stopping import RunStopped


def report(exc: OpenDeltaError) -> None:
    """One line on stderr, from rank 0 for an error every rank meets alike (a configuration or data error);
    under torchrun, also in the launcher's error file, so that its failure summary names the cause."""
    alike = isinstance(exc, DeltaConfigError | DataError)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank or not alike:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        ErrorHandler().record_exception(exc)
    if alike and not main_rank:
        time.sleep(3)  # rank 0 meets the same error: torchrun stops every rank at the first exit, so let it speak


def record_stop(stop: RunStopped) -> None:
    """Under torchrun, put the stop's one line (not a traceback) in the launcher's error file, which its
    failure summary shows."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    info = {"py_callstack": f"{stop}\n", "timestamp": str(int(time.time()))}
    with open(path, "w") as f:
        json.dump({"message": {"message": f"{type(stop).__name__}: {stop}", "extraInfo": info}}, f)


def sweep_point_run_dir(cfg: DictConfig) -> None:
    """In a sweep, each point trains in its own directory: Hydra's job directory of the point
    (``<hydra.sweep.dir>/<job number>``), or ``<run_dir>/<job number>`` when ``run_dir`` is overridden."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    if any(o.lstrip("+").startswith("run_dir=") for o in hydra_cfg.overrides.task):
        cfg.run_dir = os.path.join(cfg.run_dir, hydra_cfg.sweep.subdir)
    else:
        cfg.run_dir = os.path.join(hydra_cfg.sweep.dir, hydra_cfg.sweep.subdir)


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    """Run the composed recipe; a library error becomes one clear line and exit status 1, a stop on a
    signal or the time limit its own status (143 for SIGTERM, 130 for Ctrl-C), said once by the recipe."""
    sweep_point_run_dir(cfg)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        try:
            run(cfg)  # jobs of a local sweep share this process: it must outlive each of them
        except RunStopped as stop:  # the whole sweep stops with the point it stopped
            sweep = HydraConfig.get().sweep.dir
            print(
                f"the sweep stopped at point {HydraConfig.get().job.num}; to go on, run it again with "
                f"hydra.sweep.dir={sweep} resume=auto",
                file=sys.stderr,
                flush=True,
            )
            os._exit(stop.exit_status)
        return
    try:
        run(cfg)
        status = 0
    except RunStopped as stop:
        record_stop(stop)
        status = stop.exit_status
    except OpenDeltaError as exc:
        report(exc)
        status = 1
    # The recipe has closed its loggers and left the process group. gloo's background threads outlive
    # destroy_process_group() and can abort the interpreter's shutdown (SIGABRT after a finished run),
    # which torchrun would report as a failed rank and restart: leave without that shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
