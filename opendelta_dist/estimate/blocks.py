"""The backbone as the activation formulas see it: its architecture and its transformer blocks.

What a family's configuration and linear layers mean is read from its family description
(:attr:`opendelta_dist.families.Family.estimator`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from opendelta_dist.estimate.errors import EstimateError
from opendelta_dist.families import Architecture, estimated_model_types, estimator_named, estimator_of


def architecture_of(config: Any) -> Architecture:
    """Read an :class:`~opendelta_dist.families.Architecture` from a transformers config.

    Raises:
        EstimateError: the model type has no activation formula here.
    """
    spec = estimator_of(getattr(config, "model_type", ""))
    if spec is None:
        raise EstimateError(
            f"no activation formula for model_type {getattr(config, 'model_type', None)!r}; the estimator knows "
            f"{', '.join(estimated_model_types())}"
        )
    return spec.architecture(config)


@dataclass(frozen=True)
class BlockInfo:
    """One transformer block as the formulas see it.

    Attributes:
        name: the block's module name.
        kind: ``encoder`` or ``decoder`` (T5's decoder blocks have cross-attention; decoder-only models'
            blocks are ``encoder`` blocks with a causal mask).
        sites: the block's input sites whose tensor is kept for backward (see
            :attr:`~opendelta_dist.families.EstimatorSpec.sites`).
        lora_rank: per site, the summed ranks of the LoRA layers reading it.
        delta_per_token: elements per token that other delta modules keep (their inputs and hidden layers).
        norm_weight_trains: a normalisation weight of the block trains (full fine-tuning).
        unit_numel: parameters of the block's FSDP unit (the block without its delta modules).
        numel: all parameters of the block.
        first: the block is the first of its stack (its input is the embedding output).
        input_grad: the block's input hidden states need a gradient: something below it trains (the
            embeddings, a soft prompt, a block below). Not so for a stack's first block on frozen embeddings,
            nor for blocks below the lowest one that trains (a delta's ``leave_out``).
        trains: a parameter of the block trains.
        idle: no gradient runs through the block (its input, its parameters and, for a T5 decoder block, the
            encoder's output it attends to need none): it keeps nothing and runs no backward.
    """

    name: str
    kind: str
    sites: frozenset[str]
    lora_rank: Mapping[str, int]
    delta_per_token: int
    norm_weight_trains: bool
    unit_numel: int
    numel: int
    first: bool = False
    input_grad: bool = True
    trains: bool = True
    idle: bool = False


def _is_linear(module: nn.Module) -> bool:
    weight = module._parameters.get("weight")
    return weight is not None and weight.dim() == 2 and not isinstance(module, nn.Embedding)


def _trains_below_the_blocks(model: nn.Module, in_blocks: set[int]) -> bool:
    """Whether something trains that feeds the first block: the input embeddings (with the module around them
    when it holds no block, as BERT's ``embeddings`` with its norm), any other embedding table outside the blocks
    (positions), or a soft prompt. Other trainable modules outside the blocks (a classifier, final norms, a prefix's
    network, which reaches the blocks through their attention) run after them or beside them."""
    from opendelta_dist.deltas.soft_prompt import SoftPrompt

    embeddings = model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    parent_name = names.get(id(embeddings), "").rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else None
    feeding = [embeddings]
    if parent is not None and not any(id(p) in in_blocks for p in parent.parameters()):
        feeding.append(parent)
    feeding += [m for m in model.modules() if isinstance(m, nn.Embedding | SoftPrompt)]
    return any(p.requires_grad and id(p) not in in_blocks for m in feeding for p in m.parameters())


def describe_blocks(model: nn.Module, family: str) -> list[BlockInfo]:
    """The transformer blocks of ``model`` in forward order, with what their backward keeps.

    Args:
        model: the backbone with its delta attached and frozen.
        family: its :attr:`~opendelta_dist.families.Architecture.family`.

    Returns:
        One :class:`BlockInfo` per block.
    """
    from opendelta_dist.addressing import is_delta_module
    from opendelta_dist.deltas.lora import LowRankLinear
    from opendelta_dist.train.engines.fsdp import delta_submodules, transformer_blocks

    patterns = estimator_named(family).sites
    names = {id(m): n for n, m in model.named_modules()}
    blocks = transformer_blocks(model)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    below = _trains_below_the_blocks(model, in_blocks)

    stream = {"encoder": below, "decoder": below}  # a gradient flows up each stack from here
    infos = []
    for block in blocks:
        sites: set[str] = set()
        ranks: dict[str, int] = {}
        delta_per_token = 0
        delta_ids = {id(p) for sub in delta_submodules(block) for p in sub.parameters()}
        for local, module in block.named_modules():
            if is_delta_module(module) and not isinstance(module, LowRankLinear):
                weights = [p for p in module.parameters() if p.dim() == 2 and p.requires_grad]
                # each trainable matrix keeps its input, and the activation between two keeps its own
                delta_per_token += sum(p.shape[1] for p in weights) + sum(min(p.shape) for p in weights[1:])
            if not _is_linear(module) or is_delta_module(module):
                continue
            site = next((s for pattern, s in patterns if re.fullmatch(pattern, local)), None)
            loras = [m for m in module.children() if isinstance(m, LowRankLinear)]
            if site is None or not (module.weight.requires_grad or loras):
                continue
            sites.add(site)
            ranks[site] = ranks.get(site, 0) + sum(m.r for m in loras)
        # a norm keeps its normalised input only for its weight's gradient (a trainable bias needs none)
        norm_trains = any(
            "norm" in type(m).__name__.lower() and getattr(m._parameters.get("weight"), "requires_grad", False)
            for m in block.modules()
        )
        numel = sum(p.numel() for p in block.parameters())
        kind = "decoder" if family == "t5" and names[id(block)].startswith("decoder.") else "encoder"
        # a prefix's layers hold no parameters of their own: their keys and values come from the prefix network
        trains = any(p.requires_grad for p in block.parameters()) or any(is_delta_module(m) for m in block.modules())
        input_grad = stream[kind]
        # a T5 decoder block attends to the encoder's output, which needs a gradient where the encoder trains
        reads_grad = kind == "decoder" and stream["encoder"]
        stream[kind] = input_grad or trains or reads_grad
        infos.append(
            BlockInfo(
                name=names[id(block)],
                kind=kind,
                sites=frozenset(sites),
                lora_rank=ranks,
                delta_per_token=delta_per_token,
                norm_weight_trains=norm_trains,
                unit_numel=numel - sum(p.numel() for p in block.parameters() if id(p) in delta_ids),
                numel=numel,
                first=names[id(block)].rsplit(".", 1)[-1] == "0",
                input_grad=input_grad,
                trains=trains,
                idle=not stream[kind],
            )
        )
    return infos
