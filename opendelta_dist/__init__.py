"""opendelta_dist: plug-and-play delta tuning (LoRA, adapters, BitFit, ...) for any PyTorch model.

The public names match OpenDelta 0.3.2::

    from opendelta_dist import LoraModel, AutoDeltaModel
    delta = LoraModel(backbone_model=model)
    delta.freeze_module(exclude=["deltas"], set_state_dict=True)
    ...
    delta.save_finetuned("out/")
"""

from opendelta_dist.auto_delta import AutoDeltaConfig, AutoDeltaModel
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.config import BaseDeltaConfig
from opendelta_dist.deltas import (
    AdapterConfig,
    AdapterModel,
    BitFitConfig,
    BitFitModel,
    CompacterConfig,
    CompacterModel,
    LoraConfig,
    LoraModel,
    LowRankAdapterConfig,
    LowRankAdapterModel,
    ParallelAdapterConfig,
    ParallelAdapterModel,
    PrefixConfig,
    PrefixModel,
    SoftPromptConfig,
    SoftPromptModel,
)
from opendelta_dist.errors import OpenDeltaError
from opendelta_dist.inspect import check_optimizer, inspect_module_statistics, inspect_optimizer_statistics
from opendelta_dist.visualization import Visualization

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "AdapterModel",
    "AutoDeltaConfig",
    "AutoDeltaModel",
    "BaseDeltaConfig",
    "BitFitConfig",
    "BitFitModel",
    "CompacterConfig",
    "CompacterModel",
    "DeltaBase",
    "LoraConfig",
    "LoraModel",
    "LowRankAdapterConfig",
    "LowRankAdapterModel",
    "OpenDeltaError",
    "ParallelAdapterConfig",
    "ParallelAdapterModel",
    "PrefixConfig",
    "PrefixModel",
    "SoftPromptConfig",
    "SoftPromptModel",
    "Visualization",
    "__version__",
    "check_optimizer",
    "inspect_module_statistics",
    "inspect_optimizer_statistics",
]
