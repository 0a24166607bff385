"""torchrun, leaving the checkpoint signals to the training processes.

Slurm's ``--signal`` (without ``B:``) and ``scancel --signal`` reach every process of a job step, torchrun
included. torchrun does not handle SIGUSR1 or SIGUSR2, so their default action would end it and, with it,
its workers before they can checkpoint. This launcher ignores both and runs torchrun
(``torch.distributed.run``) with the same arguments; the workers it starts install their own handlers
(``opendelta_dist.train.stopping``). SIGTERM and SIGINT stay torchrun's: it passes them on to its workers.

    python launch/slurm/torchrun.py --nproc_per_node=2 launch/train.py +recipe=lora_t5_tiny
"""

from __future__ import annotations

import signal

from torch.distributed.run import main

if __name__ == "__main__":
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)  # inherited by the workers until they install their handlers
    main()
