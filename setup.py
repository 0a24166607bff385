"""Packaging of opendelta-dist. Install with ``pip install -c constraints.txt -e .[dev]``."""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "opendelta_dist" / "__init__.py").read_text()).group(1)

setup(
    name="opendelta-dist",
    version=VERSION,
    description="Plug-and-play delta tuning (LoRA, adapters, BitFit, ...) for any PyTorch model, up to a cluster",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["opendelta_dist", "opendelta_dist.*"]),
    package_data={"opendelta_dist.train": ["assets/*/*"]},
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.6",  # FSDP2 (torch.distributed.fsdp.fully_shard) is public from 2.6
        "transformers>=5.15",  # T5 attention on the attention interface (opendelta_dist/transformers_calls.py)
        "safetensors>=0.4.3",
        "huggingface_hub>=1.0",  # deltas pulled from and pushed to the Hub (opendelta_dist/hub.py)
        "numpy>=1.24",
        "rich>=13",
        "hydra-core>=1.3.1",  # 1.3.0 imports pkg_resources, which setuptools no longer ships
        "omegaconf>=2.3",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.17"],
        # model-center imports these without declaring them
        "bmt": ["bmtrain>=1.0.1", "model-center>=1.0.2", "requests", "six", "sentencepiece", "tqdm"],
        "wandb": ["wandb>=0.19"],
        "tensorboard": ["tensorboard>=2.14"],
        # sweeps on Slurm (launch/train.py -m hydra/launcher=slurm): Hydra's submitit launcher
        "slurm": ["hydra-submitit-launcher>=1.2", "submitit>=1.5"],
        # the tests exercise every engine and logger that runs on CPU
        "dev": [
            "pytest>=8",
            "uv>=0.9",  # scripts/lock.sh and scripts/test-deps.sh resolve with it
            "pytest-timeout>=2.3",
            "ruff>=0.8",
            "peft>=0.18",
            "deepspeed>=0.17",  # ZeRO-3 resumes exactly from 0.17 (scripts/test-deps.sh oldest)
            "tensorboard>=2.14",
            "wandb>=0.19",
            "selenium>=4.20",  # drives a real Chromium in the interactive_modify test
            "hydra-submitit-launcher>=1.2",  # the Slurm sweep tests (the slurm extra)
            "submitit>=1.5",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
