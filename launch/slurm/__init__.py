"""Slurm launch: ``train.sbatch`` (one recipe on N nodes) and ``plan`` (Slurm environment -> srun +
torchrun command, also used by the sweep launcher ``launch/hydra_plugins/``: Hydra multirun on Slurm)."""
