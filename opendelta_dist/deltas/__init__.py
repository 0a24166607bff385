"""The delta methods, one file each. Importing this package registers them with the auto classes."""

from opendelta_dist.deltas.adapter import AdapterConfig, AdapterModel
from opendelta_dist.deltas.bitfit import BitFitConfig, BitFitModel
from opendelta_dist.deltas.compacter import CompacterConfig, CompacterModel
from opendelta_dist.deltas.lora import LoraConfig, LoraModel
from opendelta_dist.deltas.low_rank_adapter import LowRankAdapterConfig, LowRankAdapterModel
from opendelta_dist.deltas.parallel_adapter import ParallelAdapterConfig, ParallelAdapterModel
from opendelta_dist.deltas.prefix import PrefixConfig, PrefixModel
from opendelta_dist.deltas.soft_prompt import SoftPromptConfig, SoftPromptModel

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
