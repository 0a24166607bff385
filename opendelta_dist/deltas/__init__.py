"""The delta methods, one file each. Importing this package registers them with the auto classes.

Every module of the package is imported, so a new method's file registers itself (its class is then
built by ``AutoDeltaModel`` and imported from ``opendelta_dist.deltas.<module>``); the names below are
OpenDelta's, re-exported here and by ``opendelta_dist``.
"""

import importlib
import pkgutil

from opendelta_dist.deltas.adapter import AdapterConfig, AdapterModel
from opendelta_dist.deltas.bitfit import BitFitConfig, BitFitModel
from opendelta_dist.deltas.compacter import CompacterConfig, CompacterModel
from opendelta_dist.deltas.lora import LoraConfig, LoraModel
from opendelta_dist.deltas.low_rank_adapter import LowRankAdapterConfig, LowRankAdapterModel
from opendelta_dist.deltas.parallel_adapter import ParallelAdapterConfig, ParallelAdapterModel
from opendelta_dist.deltas.prefix import PrefixConfig, PrefixModel
from opendelta_dist.deltas.soft_prompt import SoftPromptConfig, SoftPromptModel

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "AdapterConfig",
    "AdapterModel",
    "BitFitConfig",
    "BitFitModel",
    "CompacterConfig",
    "CompacterModel",
    "LoraConfig",
    "LoraModel",
    "LowRankAdapterConfig",
    "LowRankAdapterModel",
    "ParallelAdapterConfig",
    "ParallelAdapterModel",
    "PrefixConfig",
    "PrefixModel",
    "SoftPromptConfig",
    "SoftPromptModel",
]
